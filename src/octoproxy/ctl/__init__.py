"""``octoproxy ctl``: the operator's command line for a running control plane.

Kept light (argparse and the standard library at import): the ``octoproxy``
command builds its parser for every subcommand, the agent included.
"""

from ._main import GROUPS as GROUPS
from ._main import Api as Api
from ._main import CtlError as CtlError
from ._main import add_ctl_parser as add_ctl_parser
from ._main import parse_duration as parse_duration
from ._main import run_ctl as run_ctl
from ..common._paths import default_state_dir as default_state_dir

__all__ = ["GROUPS", "Api", "CtlError", "add_ctl_parser", "parse_duration", "run_ctl", "default_state_dir"]
