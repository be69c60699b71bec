"""The discovery protocol both sides speak: the resource types and the delta
state machines (sans-IO, ``_xds_client`` / ``_xds_server``), the proxies'
WebSocket client (``_client``), and configuration for apps (``_appconfig``).

The proxy imports this package, never :mod:`octoproxy.controlplane`. This
``__init__`` offers only the sans-IO names; the Trio client is
``octoproxy.discovery._client.DiscoveryClient``.
See ``docs/control-plane.md`` for the protocol.
"""

from ._xds_client import TYPE_ENDPOINTS as TYPE_ENDPOINTS
from ._xds_client import TYPE_ROUTES as TYPE_ROUTES
from ._xds_client import DiscoveryError as DiscoveryError
from ._xds_client import ResourceChange as ResourceChange
