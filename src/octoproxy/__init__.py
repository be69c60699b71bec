"""octoproxy: a service-mesh sidecar proxy on Trio with a Cython hot path."""

from .protocol._errors import ConfigError as ConfigError
from .protocol._errors import LocalProtocolError as LocalProtocolError
from .protocol._errors import OctoproxyError as OctoproxyError
from .protocol._errors import ProtocolError as ProtocolError
from .protocol._errors import RemoteProtocolError as RemoteProtocolError
from .protocol._protocol import Flags as Flags
from .protocol._protocol import FrameType as FrameType
from .protocol._protocol import Status as Status
from ._version import __version__ as __version__
