"""Where a control plane keeps its state, and where ``octoproxy ctl`` looks for it (no heavy imports)."""

from __future__ import annotations

import os

__all__ = ["default_state_dir"]


def default_state_dir() -> str:
    """Where the control plane keeps its CA and operator token by default.

    ``$OCTOPROXY_STATE_DIR``, else ``$XDG_STATE_HOME/octoproxy/control-plane``,
    else ``~/.local/state/octoproxy/control-plane``. ``octoproxy ctl`` looks
    for ``operator.token`` and ``admin.url`` there too.
    """
    explicit = os.environ.get("OCTOPROXY_STATE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "octoproxy", "control-plane")
