"""The control plane (stateless servers over a store) and the proxies' discovery client.

See ``docs/control-plane.md`` for the protocol.
"""

from ..discovery._xds_client import TYPE_ENDPOINTS as TYPE_ENDPOINTS
from ..discovery._xds_client import TYPE_ROUTES as TYPE_ROUTES
from ..discovery._xds_client import DiscoveryError as DiscoveryError
from ..discovery._xds_client import ResourceChange as ResourceChange
from ._auth import Authenticator as Authenticator
from ._auth import Principal as Principal
from ._auth import make_join_token as make_join_token
from ..discovery._client import DiscoveryClient as DiscoveryClient
from ._embedded import EmbeddedStore as EmbeddedStore
from ._etcd import EtcdError as EtcdError
from ._etcd import EtcdStore as EtcdStore
from ._server import DISCOVERY_PATH as DISCOVERY_PATH
from ._server import ControlPlaneServer as ControlPlaneServer
from ._store import Lease as Lease
from ._store import LeaseNotFound as LeaseNotFound
from ._store import Store as Store
from ._store import StoreChange as StoreChange
from ._store import StoreError as StoreError
from ._store import StoreUnavailable as StoreUnavailable
