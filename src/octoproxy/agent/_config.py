"""The TOML configuration of ``octoproxy agent -c agent.toml``.

Declared with the same field machinery as the proxy's configuration
(:mod:`octoproxy.proxy._config`): each key carries its kind, default and doc, so
validation, errors that name the key, and the reference in ``docs/agent.md``
(:func:`render_agent_reference`) come from one place.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import types

from ..proxy._config import (
    _EMPTY, _PATH, _Bad, _integer, _Kind, _LISTEN, _opt, _optional, _parse_table, _render_table, _required,
    _seconds, _section, _table,
)
from ..protocol._errors import ConfigError
from ._policy import PolicyConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AgentConfig", "AgentSettings", "UpgradeSettings", "DEFAULT_COMMAND", "load_agent_config", "parse_agent_config", "render_agent_reference"]

#: how the proxy is started unless ``agent.command`` says otherwise
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "octoproxy", "run")


def _convert_command(v: object, key: str, base_dir: Path | None) -> tuple[str, ...]:
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return tuple(v)
    raise _Bad


_COMMAND = _Kind("a non-empty array of non-empty strings", "array of strings", _convert_command, list)


def _convert_versions(v: object, key: str, base_dir: Path | None) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(v, Mapping):
        raise _Bad
    out: dict[str, tuple[str, ...]] = {}
    for name, cmd in v.items():
        if not name:
            raise ConfigError(f"{key}: a version name must not be empty")
        out[name] = _COMMAND.parse(cmd, f"{key}.{name}", base_dir)
    return types.MappingProxyType(out)


def _convert_paths(v: object, key: str, base_dir: Path | None) -> tuple[Path, ...]:
    if not isinstance(v, list):
        raise _Bad
    return tuple(_PATH.parse(x, f"{key}[{i}]", base_dir) for i, x in enumerate(v))


_VERSIONS: _Kind[Mapping[str, tuple[str, ...]]] = _Kind(
    "a table of commands (arrays of strings)", "table of arrays of strings", _convert_versions, lambda m: {k: list(c) for k, c in m.items()}
)
_PATHS: _Kind[tuple[Path, ...]] = _Kind(
    "an array of path strings", "array of paths (relative to the config file)", _convert_paths, lambda t: [str(p) for p in t]
)
_POSITIVE = _seconds()


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """The supervisor of one proxy. Every key but `proxy_config` is optional."""

    admin: str = _opt(
        _LISTEN, "127.0.0.1:0", "Where the agent's admin HTTP API listens: `host:port` (port 0 picks one) or `unix:/path`."
    )
    proxy_config: Path = _required(_PATH, "The proxy's configuration file, passed as `-c <file>` to `command`.")
    command: tuple[str, ...] = _opt(
        _COMMAND,
        DEFAULT_COMMAND,
        "How to start the proxy; `-c <proxy_config>` is appended (and `--hot-restart` for an upgrade).",
        default_doc='`[<this python>, "-m", "octoproxy", "run"]`',
    )
    health_interval: float = _opt(_POSITIVE, 1.0, "Time between liveness (`GET /healthz`) and readiness (`GET /ready`) checks.")
    health_timeout: float = _opt(_POSITIVE, 1.0, "Deadline of each check; a late answer is a failure.")
    failure_threshold: int = _opt(_integer(1, 1000), 3, "Liveness failures in a row that make the agent restart the proxy.")
    start_timeout: float = _opt(
        _POSITIVE, 15.0, "A started proxy must print its ready line and answer `/ready` 200 within this, or it is restarted."
    )
    backoff_initial: float = _opt(_POSITIVE, 0.2, "Delay before restarting after one failure; doubled per recent failure.")
    backoff_max: float = _opt(_POSITIVE, 10.0, "Cap on the restart delay; must be >= `backoff_initial`.")
    crash_loop_limit: int = _opt(
        _integer(1, 1000), 5, "This many failures within `crash_loop_window` stop the restarts (state `crash_loop`)."
    )
    crash_loop_window: float = _opt(_POSITIVE, 60.0, "The sliding window of the crash-loop detector (and of the back-off).")
    upgrade_timeout: float = _opt(
        _POSITIVE, 15.0, "A hot-restarted candidate must print its ready line and answer `/ready` 200 within this, or the upgrade is rolled back."
    )
    stop_grace: float = _opt(_POSITIVE, 10.0, "After SIGTERM, time the proxy gets to exit before SIGKILL.")
    log_file: Path | None = _optional(
        _PATH, "File the proxy's stderr is appended to (relative to the agent file).", default_doc="the agent's stderr"
    )
    token_file: Path | None = _optional(
        _PATH,
        "Bearer token `POST /upgrade` and `GET /status` require (mode 0600, owned by the agent's user); "
        "created with a random token if missing.",
        default_doc="`agent-admin.token` next to the agent file",
    )
    proxy_token_file: Path | None = _optional(
        _PATH,
        "The proxy's admin token file, for the agent's own calls to it (`GET /config_dump`).",
        default_doc="the `admin_token_file=` of the proxy's ready line",
    )

    def policy(self) -> PolicyConfig:
        """The :class:`~octoproxy.agent._policy.PolicyConfig` these settings describe."""
        return PolicyConfig(
            failure_threshold=self.failure_threshold,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            crash_loop_limit=self.crash_loop_limit,
            crash_loop_window=self.crash_loop_window,
            start_timeout=self.start_timeout,
            upgrade_timeout=self.upgrade_timeout,
        )


@dataclass(frozen=True, kw_only=True)
class UpgradeSettings:
    """What `POST /upgrade` may ask for. A request names a version (a key of `versions`) and/or a
    config file; it never carries a command line. `agent.proxy_config` itself is always allowed."""

    versions: Mapping[str, tuple[str, ...]] = _opt(
        _VERSIONS,
        _EMPTY,
        'Proxy commands an upgrade may switch to, by name: `"1.2" = ["/opt/octoproxy-1.2/bin/octoproxy", "run"]`.',
        default_doc="none: only the current `command`",
    )
    configs: tuple[Path, ...] = _opt(_PATHS, (), "Proxy configuration files an upgrade may switch to.")
    config_dir: Path | None = _optional(
        _PATH,
        "A directory whose regular files an upgrade may switch to (symlinks are resolved and must stay inside it); "
        "it must not be writable by anyone the agent does not trust.",
        default_doc="none",
    )


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """The whole agent file. Build it with :func:`load_agent_config`."""

    agent: AgentSettings = _required(_table(AgentSettings, "[agent]"), "The agent and the proxy it supervises.")
    upgrade: UpgradeSettings = _section(UpgradeSettings, "[upgrade]", "What `POST /upgrade` may switch the proxy to.")


def parse_agent_config(data: Mapping[str, object], *, base_dir: Path | None = None) -> AgentConfig:
    """Validate parsed TOML into an agent configuration.

    Args:
        data: the document, as ``tomllib`` returns it.
        base_dir: directory relative paths are resolved against (the agent
            file's directory); ``None`` leaves them relative.

    Returns:
        The validated configuration, defaults filled in.

    Raises:
        ConfigError: on an unknown key, a missing required key, a bad value,
            or ``backoff_max < backoff_initial``; the message starts with the key.
    """
    cfg: AgentConfig = _parse_table(AgentConfig, data, "", base_dir)
    if cfg.agent.token_file is None:
        default = (base_dir or Path()) / "agent-admin.token"
        cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, token_file=default))
    a = cfg.agent
    if a.backoff_max < a.backoff_initial:
        raise ConfigError(f"agent.backoff_max: must be >= agent.backoff_initial ({a.backoff_initial}), got {a.backoff_max}")
    return cfg


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate an agent TOML file.

    Args:
        path: the file; relative paths in it are resolved against its directory.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: if the file cannot be read, is not TOML, or does not validate.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    return parse_agent_config(data, base_dir=p.absolute().parent)


def render_agent_reference() -> str:
    """Render the key-by-key reference of the agent file (Markdown).

    Returns:
        The text ``docs/agent.md`` holds between its ``<!-- BEGIN CONFIG -->``
        and ``<!-- END CONFIG -->`` markers.
    """
    out: list[str] = []
    _render_table(AgentSettings, "[agent]", (AgentSettings.__doc__ or "").strip(), out)
    _render_table(UpgradeSettings, "[upgrade]", " ".join((UpgradeSettings.__doc__ or "").split()), out)
    return "\n".join(out)
