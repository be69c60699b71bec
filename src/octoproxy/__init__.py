"""octoproxy: a service-mesh sidecar proxy on Trio with a Cython hot path."""

from ._errors import ConfigError as ConfigError
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import OctoproxyError as OctoproxyError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._protocol import Flags as Flags
from ._protocol import FrameType as FrameType
from ._protocol import Status as Status
from ._version import __version__ as __version__
