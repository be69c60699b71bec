"""The TOML configuration of ``octoproxy run -c proxy.toml``.

The schema is declared once, as frozen dataclasses whose fields carry their
value kind (type and checks) and documentation in ``field(metadata=...)``.
Validation (:func:`parse_config`), serialisation (:meth:`ProxyConfig.to_dict`)
and the reference in ``docs/configuration.md`` (:func:`render_config_reference`)
all walk those same fields, so they cannot disagree. The few rules that span
several keys (drain before shutdown, routes name known clusters, ...) are in
:func:`_check_cross_fields`.

Every error names the full key, e.g. ``upstream.connect_timeout: expected a
positive number, got 'x'``. Validation does not stop at the first error: the
:class:`ConfigError` raised lists every one, one per line (the rules that span
several keys are checked once every key is valid on its own).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..core._balancer import BALANCERS, Endpoint
from ..protocol._errors import ConfigError
from ..protocol._protocol import DEFAULT_MAX_FRAME_SIZE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ProxyConfig", "ProxySettings", "OutboundConfig", "InboundConfig", "AdminConfig", "UpstreamConfig",
    "RouteConfig", "ClusterConfig", "EndpointConfig", "TlsConfig", "AuthzConfig", "AuthzRuleConfig",
    "load_config", "parse_config", "render_config_reference", "split_host_port", "config_errors",
    "describe_config_error",
]  # fmt: skip

T = TypeVar("T")
_META = "octoproxy.config"


# --------------------------------------------------------------------------
# Value kinds: check + convert, dump back to plain data, describe for docs.
# --------------------------------------------------------------------------


class _Bad(Exception):
    """Raised by a converter when the value is not what its kind expects."""


def config_errors(exc: ConfigError) -> list[str]:
    """The single errors a :class:`ConfigError` reports (one per line of its message)."""
    return str(exc).splitlines()


def describe_config_error(exc: ConfigError, path: str | os.PathLike[str], prog: str) -> str:
    """The lines a command prints for an invalid configuration file.

    One line for one error (``prog: invalid configuration FILE: key: what``, or
    ``prog: FILE: cannot read: ...``); for several, a heading and one indented
    line per error.
    """
    errors = config_errors(exc)
    if len(errors) == 1 and errors[0].startswith(f"{path}: "):  # cannot read, or not TOML
        return f"{prog}: {errors[0]}"
    if len(errors) == 1:
        return f"{prog}: invalid configuration {path}: {errors[0]}"
    return "\n".join([f"{prog}: invalid configuration {path}: {len(errors)} errors"] + [f"  {e}" for e in errors])


class _Errors:
    """Collects :class:`ConfigError` messages, so that one run reports them all."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def check(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)``, or ``None`` with its errors kept."""
        try:
            return fn(*args)
        except ConfigError as exc:
            self.messages.extend(config_errors(exc))
            return None

    def raise_any(self) -> None:
        if self.messages:
            raise ConfigError("\n".join(self.messages))


def _same(value: Any) -> object:
    return value


@dataclass(frozen=True)
class _Kind(Generic[T]):
    expected: str  # errors read "<key>: expected <expected>, got <value!r>"
    doc_type: str  # the type column of the docs
    convert: Callable[[object, str, Path | None], T]  # (value, key, base_dir); raises _Bad
    dump: Callable[[T], object] = _same  # back to TOML/JSON data
    table: tuple[type[Any], str] | None = None  # nested tables: (dataclass, docs heading)

    def parse(self, value: object, key: str, base_dir: Path | None) -> T:
        try:
            return self.convert(value, key, base_dir)
        except _Bad:
            raise ConfigError(f"{key}: expected {self.expected}, got {value!r}") from None


def _string(*, nonempty: bool = False) -> _Kind[str]:
    def convert(v: object, key: str, base_dir: Path | None) -> str:
        if isinstance(v, str) and (v or not nonempty):
            return v
        raise _Bad

    return _Kind("a non-empty string" if nonempty else "a string", "string", convert)


def _choice(choices: tuple[str, ...]) -> _Kind[str]:
    def convert(v: object, key: str, base_dir: Path | None) -> str:
        if isinstance(v, str) and v in choices:
            return v
        raise _Bad

    expected = "one of " + ", ".join(repr(c) for c in choices)
    return _Kind(expected, "one of " + ", ".join(f'`"{c}"`' for c in choices), convert)


def _integer(lo: int, hi: int | None = None) -> _Kind[int]:
    def convert(v: object, key: str, base_dir: Path | None) -> int:
        if isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi):
            return v
        raise _Bad

    bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    return _Kind(f"an integer {'in ' if hi is not None else ''}{bounds}", f"integer, {bounds}", convert)


def _seconds(*, allow_zero: bool = False) -> _Kind[float]:
    def convert(v: object, key: str, base_dir: Path | None) -> float:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            if v > 0 or (v == 0 and allow_zero):
                return float(v)
        raise _Bad

    if allow_zero:
        return _Kind("a number >= 0", "seconds, >= 0", convert)
    return _Kind("a positive number", "seconds, > 0", convert)


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if base_dir is None or p.is_absolute() else base_dir / p


def _convert_path(v: object, key: str, base_dir: Path | None) -> Path:
    if isinstance(v, str) and v and "\0" not in v:
        return _resolve(v, base_dir)
    raise _Bad


def _convert_mode(v: object, key: str, base_dir: Path | None) -> int:
    if isinstance(v, str) and re.fullmatch(r"(0o)?0?[0-7]{1,3}", v):
        return int(v.removeprefix("0o"), 8)
    raise _Bad


_PATH = _Kind("a non-empty path string", "path (relative to the config file)", _convert_path, str)
_MODE = _Kind("an octal permission string such as '0660'", "octal string, 0000..0777", _convert_mode, "{:04o}".format)
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 hosts in brackets: ``"[::1]:9000"``).

    Args:
        address: the address to split.

    Returns:
        ``(host, port)``, with the brackets of an IPv6 host removed.

    Raises:
        ValueError: if the address is not a host name or IP address, a colon
            and a port in 0..65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        raise ValueError(f"bad host:port address {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address in {address!r}") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"bad host in {address!r}")
    return host, int(port)


def _host_port(*, port_zero: bool = True) -> _Kind[str]:
    def convert(v: object, key: str, base_dir: Path | None) -> str:
        try:
            if isinstance(v, str) and (split_host_port(v)[1] or port_zero):
                return v
        except ValueError:
            pass
        raise _Bad

    ports = "0..65535" if port_zero else "1..65535"
    return _Kind(f"a host:port address (port {ports}, IPv6 in brackets)", f"host:port (port {ports})", convert)


def _convert_listen(v: object, key: str, base_dir: Path | None) -> str:
    if isinstance(v, str) and v.startswith("unix:"):
        return "unix:" + str(_convert_path(v.removeprefix("unix:"), key, base_dir))
    return _host_port().convert(v, key, base_dir)


def _convert_url_list(v: object, key: str, base_dir: Path | None) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise _Bad
    out, errors = [], _Errors()
    for i, x in enumerate(v):
        if not isinstance(x, str) or not (x.startswith("ws://") or x.startswith("wss://")):
            errors.add(f"{key}[{i}]: expected a ws:// URL, got {x!r}")
        out.append(x)
    errors.raise_any()
    return tuple(out)


def _convert_bool(v: object, key: str, base_dir: Path | None) -> bool:
    if isinstance(v, bool):
        return v
    raise _Bad


_BOOL = _Kind("true or false", "boolean", _convert_bool)
_URL_LIST = _Kind("a list of ws:// URLs", "list of ws:// URLs", _convert_url_list, list)


def _mapping(v: object) -> Mapping[str, object]:
    if not isinstance(v, Mapping):
        raise _Bad
    return v


def _convert_str_map(v: object, key: str, base_dir: Path | None) -> Mapping[str, str]:
    out: dict[str, str] = {}
    errors = _Errors()
    for k, x in _mapping(v).items():
        if not isinstance(x, str):
            errors.add(f"{key}.{k}: expected a string, got {x!r}")
        else:
            out[k] = x
    errors.raise_any()
    return types.MappingProxyType(out)


_LISTEN = _Kind("'host:port' or 'unix:/path'", "host:port or unix:path (relative to the config file)", _convert_listen)
_STR_MAP: _Kind[Mapping[str, str]] = _Kind("a table of strings", "table of strings", _convert_str_map, dict)


def _table(cls: type[T], heading: str) -> _Kind[T]:
    def convert(v: object, key: str, base_dir: Path | None) -> T:
        return _parse_table(cls, _mapping(v), key, base_dir)

    return _Kind("a table", "table", convert, _dump_table, (cls, heading))


def _table_array(cls: type[T], heading: str) -> _Kind[tuple[T, ...]]:
    item = _table(cls, heading)

    def convert(v: object, key: str, base_dir: Path | None) -> tuple[T, ...]:
        if not isinstance(v, list):
            raise _Bad
        errors = _Errors()
        out = [errors.check(item.parse, x, f"{key}[{i}]", base_dir) for i, x in enumerate(v)]
        errors.raise_any()
        return tuple(x for x in out if x is not None)

    def dump(v: tuple[T, ...]) -> object:
        return [_dump_table(x) for x in v]

    return _Kind("an array of tables", "array of tables", convert, dump, (cls, heading))


def _table_map(cls: type[T], heading: str) -> _Kind[Mapping[str, T]]:
    item = _table(cls, heading)

    def convert(v: object, key: str, base_dir: Path | None) -> Mapping[str, T]:
        errors = _Errors()
        out = {k: errors.check(item.parse, x, f"{key}.{k}", base_dir) for k, x in _mapping(v).items()}
        errors.raise_any()
        return types.MappingProxyType({k: x for k, x in out.items() if x is not None})

    def dump(v: Mapping[str, T]) -> object:
        return {k: _dump_table(x) for k, x in v.items()}

    return _Kind("a table of tables", "table of tables", convert, dump, (cls, heading))


@dataclass(frozen=True)
class _Opt:
    kind: _Kind[Any]
    doc: str
    default_doc: str | None = None  # overrides the rendered default
    section: bool = False  # a table whose default is its own defaults


def _opt(kind: _Kind[T], default: T, doc: str, *, default_doc: str | None = None) -> T:
    meta = {_META: _Opt(kind, doc, default_doc)}
    if isinstance(default, types.MappingProxyType):  # unhashable, so dataclasses wants a factory
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def _optional(kind: _Kind[T], doc: str, *, default_doc: str) -> T | None:
    return field(default=None, metadata={_META: _Opt(kind, doc, default_doc)})


def _required(kind: _Kind[T], doc: str) -> T:
    required: T = field(metadata={_META: _Opt(kind, doc, "required")})
    return required


def _section(cls: type[T], heading: str, doc: str) -> T:
    return field(default_factory=cls, metadata={_META: _Opt(_table(cls, heading), doc, section=True)})


_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


# --------------------------------------------------------------------------
# The generic walkers over the schema below.
# --------------------------------------------------------------------------


def _opts(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], _Opt]]:
    return [(f, f.metadata[_META]) for f in dataclasses.fields(cls)]


def _parse_table(cls: type[T], data: Mapping[str, object], prefix: str, base_dir: Path | None) -> T:
    opts = _opts(cls)
    dot = prefix + "." if prefix else ""
    names = {f.name for f, _ in opts}
    errors = _Errors()
    for k in data:
        if k not in names:
            errors.add(f"{dot}{k}: unknown key")
    values: dict[str, Any] = {}
    for f, opt in opts:
        if f.name in data:
            values[f.name] = errors.check(opt.kind.parse, data[f.name], dot + f.name, base_dir)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.add(f"{dot}{f.name}: required key missing")
        elif isinstance(f.default, Path):  # a defaulted relative path still follows the file
            values[f.name] = _resolve(str(f.default), base_dir)
        elif opt.section:  # absent section: its defaults, resolved
            values[f.name] = errors.check(opt.kind.parse, {}, dot + f.name, base_dir)
    errors.raise_any()  # every error of this table and the tables inside it
    return cls(**values)


def _dump_table(obj: Any) -> dict[str, Any]:
    values = ((f.name, opt, getattr(obj, f.name)) for f, opt in _opts(type(obj)))
    return {name: opt.kind.dump(v) for name, opt, v in values if v is not None}


# --------------------------------------------------------------------------
# The schema: one table per section, each row a field (name, kind, default, doc).
# --------------------------------------------------------------------------

_STR, _NAME, _POSITIVE = _string(), _string(nonempty=True), _seconds()


def _environment() -> _Kind[str]:
    """An environment name of configuration for apps: ``[A-Za-z0-9][A-Za-z0-9_-]*``, at most 63 chars."""

    def convert(v: object, key: str, base_dir: Path | None) -> str:
        if isinstance(v, str) and 0 < len(v) <= 63 and v[0].isascii() and v[0].isalnum() and all(
            c.isascii() and (c.isalnum() or c in "_-") for c in v
        ):
            return v
        raise _Bad

    return _Kind("an environment name ([A-Za-z0-9_-], no dot, at most 63 chars)", "string", convert)
_BUFFER_DOC = (
    "Per-connection output buffer, in bytes: beyond it a {} is not read until it takes half of its queue, and the "
    "excess is charged to `proxy.memory_budget`."
)


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    """``[proxy]``: the proxy process itself."""

    service: str = _opt(_STR, "", "The local app's service name, stamped as `caller` on outgoing requests.")
    max_frame_size: int = _opt(
        _integer(1024, 1 << 30), DEFAULT_MAX_FRAME_SIZE, "Largest frame accepted, in bytes; larger is FRAME_TOO_LARGE."
    )
    drain_time: float = _opt(_POSITIVE, 5.0, "On SIGTERM or drain, in-flight work gets this long to finish.")
    shutdown_time: float = _opt(
        _POSITIVE, 10.0, "Hard stop after SIGTERM; must be greater than `drain_time`.", default_doc="`10.0`, or `drain_time` + 5 if more"
    )
    log_level: str = _opt(_choice(("debug", "info", "warning", "error")), "info", "Log verbosity.")
    hot_restart_uds: Path | None = _optional(
        _PATH,
        "Unix socket over which a new process (`run --hot-restart`) takes the listeners from this one.",
        default_doc="`outbound.uds` + `.hotrestart`",
    )
    hot_restart_timeout: float = _opt(
        _POSITIVE, 30.0, "A new process must be ready (pools warm) this soon after taking the listeners, or it gives up."
    )
    hot_restart_hello_timeout: float = _opt(
        _POSITIVE,
        2.0,
        "A peer of the hot-restart socket must present its uid and secret within this, or it is dropped.",
    )
    memory_budget: int = _opt(
        _integer(1 << 20),
        32 * 1024 * 1024,
        "Proxy-wide bytes for incoming frames larger than `connection_buffer_limit` and for responses queued beyond a "
        "connection's `max_buffer`. A frame that does not fit is answered OVERLOADED and skipped (the connection stays); "
        "a reader whose queue does not fit is cut off. The default takes two `max_frame_size` frames at once "
        "(docs/operations.md, \"Limits\").",
    )
    connection_buffer_limit: int = _opt(
        _integer(65536),
        1024 * 1024,
        "Bytes of one incoming frame a connection may buffer without drawing on `memory_budget` "
        "(as Envoy's `per_connection_buffer_limit_bytes`).",
    )
    frame_timeout: float = _opt(
        _POSITIVE,
        30.0,
        "A frame whose first bytes arrived must be complete within this time, and a connection with output queued "
        "must take some of it within this time; otherwise that connection alone is closed and its buffers released.",
    )
    fd_reserve: int = _opt(
        _integer(0, 1 << 20),
        64,
        "File descriptors kept free below RLIMIT_NOFILE for the admin and hot-restart sockets and upstream connections; "
        "when data connections reach the rest, the oldest idle one is shed for a new one.",
    )
    environment: str = _opt(
        _environment(),
        "default",
        "Environment of the app's configuration (`GET /config`, `sdk.get_config`): the proxy gets "
        "`proxy.service`'s configuration for this environment from the control plane.",
    )
    region: str = _opt(
        _STR, "", "This proxy's region: governed routes prefer endpoints near it (docs/governance.md).",
        default_doc="`discovery.region`, else none",
    )
    center: str = _opt(_STR, "", "This proxy's center (between region and IDC), for locality-aware routing.")
    idc: str = _opt(_STR, "", "This proxy's data centre (IDC).", default_doc="`discovery.idc`, else none")


@dataclass(frozen=True, kw_only=True)
class OutboundConfig:
    """``[outbound]``: the local SDK side (app -> proxy)."""

    uds: Path = _opt(_PATH, Path("octoproxy-outbound.sock"), "Unix socket the local SDK connects to.")
    uds_mode: int = _opt(_MODE, 0o660, "Permissions of the socket file.")
    max_connections: int = _opt(_integer(1), 1024, "SDK connections at once; beyond this, refused with OVERLOADED.")
    max_buffer: int = _opt(_integer(65536), 4 * 1024 * 1024, _BUFFER_DOC.format("client"))
    max_pending: int = _opt(_integer(1), 65536, "Requests in flight through this proxy; beyond this, OVERLOADED.")
    idle_timeout: float = _opt(
        _seconds(allow_zero=True),
        3600.0,
        "An SDK connection with nothing in flight and no request forwarded for this long gets GOAWAY and is closed; "
        "0 disables.",
    )


@dataclass(frozen=True, kw_only=True)
class InboundConfig:
    """``[inbound]``: peer proxies -> this proxy -> local app."""

    listen: str = _opt(_host_port(), "127.0.0.1:9000", "Where peer proxies connect; other hosts need a routable address.")
    app_uds: Path = _opt(
        _PATH,
        Path("octoproxy-app.sock"),
        "Unix socket of the local app that serves the requests (frames).",
        default_doc="required with `app_codec = \"frame\"`",
    )
    app_connections: int = _opt(_integer(1, 64), 2, "Multiplexed connections to the local app.")
    max_connections: int = _opt(_integer(1), 1024, "Peer connections accepted at once.")
    max_buffer: int = _opt(_integer(65536), 4 * 1024 * 1024, _BUFFER_DOC.format("peer"))
    idle_timeout: float = _opt(
        _seconds(allow_zero=True),
        3600.0,
        "A peer connection with nothing in flight and no request forwarded for this long gets GOAWAY and is closed; "
        "0 disables.",
    )
    max_timeout: float | None = _optional(
        _POSITIVE, "Cap on the deadline of requests from peers.", default_doc="none: the caller's deadline holds"
    )
    app_codec: str = _opt(
        _choice(("frame", "http1")),
        "frame",
        'How the local app is spoken to: `"frame"` (an SDK app on `app_uds`) or `"http1"` (a plain HTTP/1.1 app on '
        "`app_http`; docs/http.md).",
    )
    app_http: str | None = _optional(
        _host_port(port_zero=False), "With `app_codec = \"http1\"`: the app's HTTP port, `host:port`.", default_doc="none"
    )
    app_http_connections: int = _opt(
        _integer(1, 4096), 64, "With `app_codec = \"http1\"`: keep-alive connections to the app, and requests it sees at once."
    )
    app_http_timeout: float = _opt(
        _POSITIVE, 60.0, "With `app_codec = \"http1\"`: longest wait for the app's answer to a request without a deadline."
    )


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    """``[http]``: plain HTTP/1.1 clients of the local apps -> this proxy -> the mesh (docs/http.md)."""

    listen: str = _opt(_host_port(), "127.0.0.1:15080", "Where the HTTP/1.1 listener accepts (codec `http1`); loopback by default.")
    max_connections: int = _opt(_integer(1), 1024, "Client connections at once; one more is answered 503 (OVERLOADED) and closed.")
    max_body: int = _opt(_integer(0, 1 << 30), 1024 * 1024, "Largest request body, in bytes; larger is answered 413.")
    max_header_size: int = _opt(_integer(1024, 1 << 20), 65536, "Largest request head (request line and headers); larger is 431.")
    read_timeout: float = _opt(_POSITIVE, 10.0, "A request begun must be received whole within this, or it is answered 408.")
    idle_timeout: float = _opt(_seconds(allow_zero=True), 60.0, "An idle keep-alive connection is closed after this; 0 disables.")
    request_timeout: float = _opt(
        _POSITIVE, 60.0, "Longest wait for an answer through the mesh (the route's timeout applies first); then 504."
    )
    drain_grace: float = _opt(
        _POSITIVE, 1.0, "On drain, an idle keep-alive connection is closed once quiet this long; requests arriving are answered."
    )


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    """``[admin]``: the admin HTTP endpoint (health, stats, config dump, subscribe)."""

    listen: str = _opt(_LISTEN, "127.0.0.1:0", "Where the admin HTTP server listens: `host:port` or `unix:/path`.")
    token_file: Path | None = _optional(
        _PATH,
        "File holding the bearer token that endpoints which change behaviour or reveal configuration require "
        "(mode 0600, owned by the proxy's user); created with a random token if missing.",
        default_doc="`outbound.uds` + `.admin-token`",
    )
    max_connections: int = _opt(_integer(1, 4096), 64, "Admin connections served at once; one more is answered 503 and closed.")


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """``[upstream]``: pooled connections to peer proxies."""

    connections_per_endpoint: int = _opt(_integer(1, 64), 2, "Multiplexed TCP connections kept per endpoint.")
    connect_timeout: float = _opt(_POSITIVE, 1.0, "Deadline for establishing an upstream connection.")
    ping_interval: float = _opt(_seconds(allow_zero=True), 10.0, "Idle time before a PING is sent; 0 disables PING.")
    ping_timeout: float = _opt(_POSITIVE, 5.0, "A connection whose PONG takes longer than this is closed.")
    default_timeout: float = _opt(_POSITIVE, 5.0, "Request deadline when neither the frame nor the route gives one.")
    high_watermark: int = _opt(
        _integer(65536),
        4 * 1024 * 1024,
        "Bytes queued on one upstream connection above which, once it sends nothing for 0.5 s (or holds a whole "
        "`max_frame_size` more), it takes no new request: another connection of the cluster does, or the caller gets "
        "OVERLOADED (back-pressure per destination, as Envoy's watermarks).",
    )


@dataclass(frozen=True, kw_only=True)
class RouteConfig:
    """One ``[[routes]]`` entry: (service, method) -> cluster."""

    service: str = _required(_NAME, "Callee service name to match.")
    method: str = _opt(_NAME, "*", 'Method to match; `"*"` matches any method.')
    cluster: str = _required(_NAME, "Name of the cluster (under `[clusters]`) to send to.")
    # None only until parse_config fills in upstream.default_timeout.
    timeout: float | None = _optional(
        _POSITIVE, "Request deadline when the frame gives none.", default_doc="`upstream.default_timeout`"
    )
    max_timeout: float | None = _optional(
        _POSITIVE, "Cap on the request deadline.", default_doc="none: the caller's deadline holds"
    )


@dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    """One static endpoint of a cluster."""

    address: str = _required(_host_port(port_zero=False), "Address of the peer proxy.")
    weight: int = _opt(_integer(0, 1_000_000), 100, "Relative share of traffic; 0 takes it out of rotation.")
    region: str = _opt(_STR, "", "Region of the endpoint, for locality-aware routing.")
    idc: str = _opt(_STR, "", "Data centre (IDC) of the endpoint.")
    tags: Mapping[str, str] = _opt(_STR_MAP, _EMPTY, "Routing tags (e.g. a set / swimlane name).")
    center: str = _opt(_STR, "", "Center of the endpoint (between region and IDC).")
    role: str = _opt(
        _choice(("normal", "backup")), "normal", "`backup`: governed routes use it only when no normal endpoint is usable."
    )

    def to_endpoint(self) -> Endpoint:
        """Build the balancer's (mutable) view of this endpoint.

        Returns:
            A new healthy :class:`~octoproxy.core._balancer.Endpoint` with no requests in flight.
        """
        return Endpoint(self.address, self.weight, self.region, self.idc, dict(self.tags), center=self.center, backup=self.role == "backup")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """``[clusters.<name>]``: a set of endpoints and how to balance over them."""

    lb: str = _opt(_choice(BALANCERS), "round_robin", "Load-balancing policy.")
    endpoints: tuple[EndpointConfig, ...] = _opt(
        _table_array(EndpointConfig, "clusters.<name>.endpoints[]"),
        (),
        "Static endpoints (inline tables, keys below); discovery may add more.",
    )


@dataclass(frozen=True, kw_only=True)
class DiscoveryConfig:
    """``[discovery]``: on-demand discovery from the control plane."""

    control_plane: tuple[str, ...] = _required(
        _URL_LIST, "Control-plane URLs (`ws://host:port/v1/discovery`); the proxy fails over between them."
    )
    node_id: str = _opt(_STR, "", "This proxy's name towards the control plane; default `<service>@<host>:<pid>`.")
    subscriptions_file: Path | None = _optional(
        _PATH,
        "Where subscriptions are persisted (atomic writes) and restored from before the proxy reports ready.",
        default_doc="`outbound.uds` + `.subscriptions.json`",
    )
    subscribe_timeout: float = _opt(
        _POSITIVE, 5.0, "`POST /subscribe`, and the first call to an unsubscribed service, wait this long for endpoints."
    )
    idle_unsubscribe: float = _opt(
        _seconds(allow_zero=True), 600.0, "A subscription unused for this long is dropped; 0 keeps them forever."
    )
    lb: str = _opt(_choice(BALANCERS), "round_robin", "Load-balancing policy of discovered clusters.")
    route_timeout: float | None = _optional(
        _POSITIVE,
        "Request deadline cap of discovered routes (and their deadline when the frame gives none).",
        default_doc="no cap; `upstream.default_timeout` when the frame gives none",
    )
    register: bool = _opt(_BOOL, True, "With `[inbound]`: register the local app's endpoint once its UDS answers.")
    advertise: str = _opt(_STR, "", "Address registered for this proxy's inbound side; default `inbound.listen`.")
    weight: int = _opt(_integer(0, 1_000_000), 100, "Registered weight.")
    region: str = _opt(_STR, "", "Registered region.", default_doc="`proxy.region`")
    idc: str = _opt(_STR, "", "Registered data centre (IDC).", default_doc="`proxy.idc`")
    tags: Mapping[str, str] = _opt(_STR_MAP, _EMPTY, "Registered routing tags.")
    role: str = _opt(
        _choice(("normal", "backup")), "normal", "Registered role: `backup` endpoints take traffic only when no normal one is usable."
    )
    warmup: float = _opt(
        _seconds(allow_zero=True),
        0.0,
        "Registered warm-up (slow start) window: callers ramp this endpoint's weight up over it after it first "
        "registers; 0 = the callers' `routing.slow_start.window`.",
    )
    lease_ttl: float = _opt(_POSITIVE, 10.0, "Registration lease: a dead host's endpoint disappears within this time.")
    join_token_file: Path | None = _optional(
        _PATH,
        "File holding this service's join token (`octoproxy ctl token create --service S`), sent as "
        "`Authorization: Bearer` to the control plane; read at each connection. Keep it mode 0600.",
        default_doc="none (the control plane refuses the session unless a client certificate authenticates it)",
    )
    ca_file: Path | None = _optional(
        _PATH,
        "CA certificates (PEM) to verify a `wss://` control plane with (its `ca.crt`).",
        default_doc="the system's trust store",
    )
    app_config_file: Path | None = _optional(
        _PATH,
        "Where the last configuration for the app (`GET /config`) is persisted (atomic writes, mode 0600); "
        "served at start while the control plane is down.",
        default_doc="`outbound.uds` + `.appconfig.json`",
    )


def _convert_str_list(v: object, key: str, base_dir: Path | None) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise _Bad
    out = []
    for i, x in enumerate(v):
        if not isinstance(x, str) or not x:
            raise ConfigError(f"{key}[{i}]: expected a non-empty string, got {x!r}")
        out.append(x)
    return tuple(out)


def _convert_trust_domain(v: object, key: str, base_dir: Path | None) -> str:
    from ..identity._names import check_trust_domain

    try:
        if isinstance(v, str):
            return check_trust_domain(v)
    except ValueError:
        pass
    raise _Bad


_STR_LIST = _Kind("a list of non-empty strings", "list of strings", _convert_str_list, list)
_TRUST_DOMAIN = _Kind(
    "a trust domain (lower-case letters, digits, '.', '-', '_')", "SPIFFE trust domain", _convert_trust_domain
)


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """``[tls]``: mTLS between proxies (the inbound listener and the pooled upstream links)."""

    mode: str | None = _optional(
        _choice(("mtls", "plaintext")),
        "`mtls`: TLS 1.3 with certificates on both sides, the caller identified by its certificate; "
        "`plaintext`: no TLS (callers unverified). See docs/security.md.",
        default_doc="`mtls` when `cert_file` is set, or with `[discovery]` and `proxy.service` (certificates from the control plane); else `plaintext`",
    )
    cert_file: Path | None = _optional(
        _PATH, "This proxy's certificate chain (PEM), URI SAN `spiffe://<trust_domain>/svc/<proxy.service>`.", default_doc="none"
    )
    key_file: Path | None = _optional(
        _PATH, "Its private key (PEM); the file must be mode 0600 or stricter.", default_doc="none"
    )
    ca_file: Path | None = _optional(_PATH, "The mesh's trust bundle (PEM CA certificates).", default_doc="none")
    trust_domain: str = _opt(_TRUST_DOMAIN, "octoproxy.local", "SPIFFE trust domain of the mesh; peers of another are refused.")
    handshake_timeout: float = _opt(_POSITIVE, 5.0, "Deadline for a TLS handshake (both directions).")
    reload_interval: float = _opt(
        _POSITIVE, 1.0, "How often the certificate files are checked; changed files are loaded for new connections."
    )


@dataclass(frozen=True, kw_only=True)
class AuthzRuleConfig:
    """One ``[[authz.rules]]`` entry: allow or deny some callers some methods."""

    action: str = _required(_choice(("allow", "deny")), "What the rule does; a matching `deny` wins over any `allow`.")
    callers: tuple[str, ...] = _required(_STR_LIST, 'Caller services (from their certificates), or `"*"` for every caller.')
    methods: tuple[str, ...] = _opt(_STR_LIST, ("*",), 'Methods: exact names, prefixes such as `"Get*"`, or `"*"`.')


@dataclass(frozen=True, kw_only=True)
class AuthzConfig:
    """``[authz]``: who may call this proxy's service (checked on the inbound side)."""

    default: str = _opt(
        _choice(("allow", "deny")), "allow", "When no rule matches: `allow`, or `deny` (callers no allow rule names)."
    )
    rules: tuple[AuthzRuleConfig, ...] = _opt(
        _table_array(AuthzRuleConfig, "[[authz.rules]]"), (), "Allow and deny rules, keys below."
    )


def _convert_governance(v: object, key: str, base_dir: Path | None) -> Any:
    from ..governance import parse_policy_set  # PolicyError is a ConfigError: every bad key, each named

    if not isinstance(v, Mapping):
        raise _Bad
    return parse_policy_set(v, prefix=key)


def _dump_governance(v: Any) -> object:
    from ..governance import dump_policy_set

    return dump_policy_set(v)


_GOVERNANCE = _Kind("a table (docs/governance.md, section 9)", "table, docs/governance.md", _convert_governance, _dump_governance)


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """The whole configuration file. Build it with :func:`load_config` / :func:`parse_config`."""

    proxy: ProxySettings = _section(ProxySettings, "[proxy]", "The proxy process itself.")
    outbound: OutboundConfig = _section(OutboundConfig, "[outbound]", "The local SDK side: app -> proxy, over a UDS.")
    inbound: InboundConfig | None = _optional(
        _table(InboundConfig, "[inbound]"),
        "Peer proxies -> this proxy -> local app. Optional: without this section the proxy has no inbound side.",
        default_doc="absent",
    )
    admin: AdminConfig = _section(AdminConfig, "[admin]", "The admin HTTP endpoint.")
    upstream: UpstreamConfig = _section(UpstreamConfig, "[upstream]", "Pooled, multiplexed connections to peer proxies.")
    routes: tuple[RouteConfig, ...] = _opt(
        _table_array(RouteConfig, "[[routes]]"),
        (),
        "Outbound routes, (service, method) -> cluster. Each (service, method) pair may appear once.",
    )
    clusters: Mapping[str, ClusterConfig] = _opt(
        _table_map(ClusterConfig, "[clusters.<name>]"), _EMPTY, "Upstream clusters by name."
    )
    discovery: DiscoveryConfig | None = _optional(
        _table(DiscoveryConfig, "[discovery]"),
        "On-demand discovery. Optional: without it, only the static clusters above are known.",
        default_doc="absent",
    )
    tls: TlsConfig = _section(TlsConfig, "[tls]", "mTLS between proxies.")
    authz: AuthzConfig = _section(AuthzConfig, "[authz]", "Caller authorization on the inbound side.")
    governance: Any = _optional(
        _GOVERNANCE,
        "Governance policies by service (routing rules, outlier ejection, circuit breakers, retries, rate limits, "
        "tracing, access log), as docs/governance.md section 9 describes; a control plane may replace them live.",
        default_doc="absent: every route on the fast path",
    )
    http: HttpConfig | None = _optional(
        _table(HttpConfig, "[http]"),
        "The HTTP/1.1 listener for apps without the SDK. Optional: without this section there is none.",
        default_doc="absent",
    )

    @property
    def tls_mode(self) -> str:
        """``"mtls"`` or ``"plaintext"``: ``tls.mode``, or what the other keys imply."""
        if self.tls.mode is not None:
            return self.tls.mode
        if self.tls.cert_file is not None:
            return "mtls"
        if CONTROL_PLANE_CERTIFICATES and self.discovery is not None and self.proxy.service:
            return "mtls"  # certificates from the control plane
        return "plaintext"

    @property
    def tls_from_control_plane(self) -> bool:
        """mTLS with certificates the control plane issues (no certificate files)."""
        return self.tls_mode == "mtls" and self.tls.cert_file is None

    @property
    def subscriptions_path(self) -> Path:
        """Where discovery subscriptions are persisted."""
        if self.discovery is not None and self.discovery.subscriptions_file is not None:
            return self.discovery.subscriptions_file
        return self.outbound.uds.with_name(self.outbound.uds.name + ".subscriptions.json")

    @property
    def app_config_path(self) -> Path:
        """Where the app's last configuration is persisted (``discovery.app_config_file`` or its default)."""
        if self.discovery is not None and self.discovery.app_config_file is not None:
            return self.discovery.app_config_file
        return self.outbound.uds.with_name(self.outbound.uds.name + ".appconfig.json")

    @property
    def hot_restart_path(self) -> Path:
        """Where the hot-restart socket lives (``proxy.hot_restart_uds`` or its default)."""
        if self.proxy.hot_restart_uds is not None:
            return self.proxy.hot_restart_uds
        return self.outbound.uds.with_name(self.outbound.uds.name + ".hotrestart")

    @property
    def admin_token_path(self) -> Path:
        """Where the admin token lives (``admin.token_file`` or its default, next to the sockets)."""
        if self.admin.token_file is not None:
            return self.admin.token_file
        return self.outbound.uds.with_name(self.outbound.uds.name + ".admin-token")

    @property
    def hot_restart_secret_path(self) -> Path:
        """The hot-restart secret: next to the hot-restart socket, rewritten by each generation."""
        path = self.hot_restart_path
        return path.with_name(path.name + ".secret")

    def to_dict(self) -> dict[str, Any]:
        """Serialise to plain data (what ``GET /config_dump`` returns).

        Returns:
            A JSON-able dict that :func:`parse_config` turns back into an equal
            config; paths are absolute when the config was loaded from a file,
            and an absent ``[inbound]`` is omitted.
        """
        return _dump_table(self)


#: without ``proxy.shutdown_time``, the hard stop comes this long after ``proxy.drain_time`` (at least)
SHUTDOWN_MARGIN = 5.0


def _shutdown_time(proxy: ProxySettings, written: Mapping[str, object], errors: _Errors) -> ProxySettings:
    """``shutdown_time`` must exceed ``drain_time``; say so in terms of what the file sets."""
    drain, shutdown = proxy.drain_time, proxy.shutdown_time
    if shutdown > drain:
        return proxy
    if "shutdown_time" not in written:  # only drain_time was set: the hard stop follows it
        return dataclasses.replace(proxy, shutdown_time=drain + SHUTDOWN_MARGIN)
    if "drain_time" not in written:
        errors.add(
            f"proxy.shutdown_time: {shutdown} must be greater than proxy.drain_time, whose default is {drain}; "
            f"set proxy.drain_time below {shutdown} too, or a longer shutdown_time"
        )
    else:
        errors.add(f"proxy.shutdown_time: {shutdown} must be greater than proxy.drain_time ({drain})")
    return proxy


#: the control plane issues certificates (``DiscoveryClient.request_certificate``)
CONTROL_PLANE_CERTIFICATES = True


def _check_tls(cfg: ProxyConfig, errors: _Errors) -> None:
    tls = cfg.tls
    files = {"cert_file": tls.cert_file, "key_file": tls.key_file, "ca_file": tls.ca_file}
    given = [k for k, v in files.items() if v is not None]
    if given and len(given) != 3:
        missing = ", ".join(f"tls.{k}" for k, v in files.items() if v is None)
        errors.add(f"{missing}: required with tls.{given[0]} (certificate, key and trust bundle go together)")
    if tls.mode == "plaintext" and given:
        errors.add("tls.mode: 'plaintext' but tls.cert_file is set; remove one of them")
    if tls.mode == "mtls" and not given and not (CONTROL_PLANE_CERTIFICATES and cfg.discovery is not None):
        errors.add("tls.mode: 'mtls' needs tls.cert_file, tls.key_file and tls.ca_file, or [discovery] (certificates from the control plane)")
    if cfg.tls_mode == "mtls" and not cfg.proxy.service:
        errors.add("proxy.service: required with mTLS (the certificate names this service)")
    for i, rule in enumerate(cfg.authz.rules):
        for j, m in enumerate(rule.methods):
            if "*" in m[:-1]:
                errors.add(f"authz.rules[{i}].methods[{j}]: {m!r}: a name, a prefix ending in '*', or '*'")


def _check_cross_fields(cfg: ProxyConfig, data: Mapping[str, object]) -> ProxyConfig:
    errors = _Errors()
    _check_tls(cfg, errors)
    written = data.get("proxy")
    proxy = _shutdown_time(cfg.proxy, written if isinstance(written, Mapping) else {}, errors)
    for name, cluster in cfg.clusters.items():
        addresses: dict[str, int] = {}
        for i, ep in enumerate(cluster.endpoints):
            if (first := addresses.setdefault(ep.address, i)) != i:
                errors.add(
                    f"clusters.{name}.endpoints[{i}].address: duplicate address {ep.address!r} (also endpoints[{first}])"
                )
    pairs: dict[tuple[str, str], int] = {}
    routes = []
    for i, route in enumerate(cfg.routes):
        if route.cluster not in cfg.clusters:
            errors.add(f"routes[{i}].cluster: unknown cluster {route.cluster!r}")
        if (first := pairs.setdefault((route.service, route.method), i)) != i:
            errors.add(
                f"routes[{i}]: duplicate route for service {route.service!r} method {route.method!r} (also routes[{first}])"
            )
        if route.timeout is None:
            route = dataclasses.replace(route, timeout=cfg.upstream.default_timeout)
        routes.append(route)
    inbound = data.get("inbound")
    if cfg.inbound is not None and isinstance(inbound, Mapping):
        if cfg.inbound.app_codec == "frame" and "app_uds" not in inbound:
            errors.add("inbound.app_uds: required key missing (the app's Unix socket; an HTTP app: app_codec = \"http1\", app_http)")
        if cfg.inbound.app_codec == "http1" and cfg.inbound.app_http is None:
            errors.add("inbound.app_http: required with app_codec = \"http1\" (the app's HTTP port, host:port)")
    errors.raise_any()
    return dataclasses.replace(cfg, proxy=proxy, routes=tuple(routes))


def parse_config(data: Mapping[str, object], *, base_dir: Path | None = None) -> ProxyConfig:
    """Validate parsed TOML (or :meth:`ProxyConfig.to_dict` output) into a config.

    Args:
        data: the document, as ``tomllib`` returns it.
        base_dir: directory that relative socket paths are resolved against
            (the config file's directory); ``None`` leaves them relative.

    Returns:
        The validated configuration, with every default filled in (a route
        without ``timeout`` gets ``upstream.default_timeout``; without
        ``proxy.shutdown_time``, a ``proxy.drain_time`` of 10 s or more
        moves the hard stop to ``drain_time`` + 5 s).

    Raises:
        ConfigError: on unknown keys, missing required keys, values of the
            wrong type or out of range, or inconsistencies between keys: every
            error found, one per line, each starting with its full key (see
            :func:`config_errors`).
    """
    return _check_cross_fields(_parse_table(ProxyConfig, data, "", base_dir), data)


def load_config(path: str | os.PathLike[str]) -> ProxyConfig:
    """Read and validate a TOML configuration file.

    Args:
        path: the file; relative socket paths in it are resolved against its directory.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: if the file cannot be read, is not valid TOML, or does not
            validate (see :func:`parse_config`).
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    return parse_config(data, base_dir=p.absolute().parent)


# --------------------------------------------------------------------------
# Documentation, from the same fields.
# --------------------------------------------------------------------------


def _render_default(f: dataclasses.Field[Any], opt: _Opt) -> str:
    if opt.default_doc is not None:
        return opt.default_doc
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    dumped = opt.kind.dump(default)
    return f"`{dumped!r}`" if isinstance(dumped, float) else f"`{json.dumps(dumped)}`"


def _render_table(cls: type[Any], heading: str, doc: str, out: list[str]) -> None:
    nested: list[tuple[type[Any], str, str]] = []
    out += [f"### `{heading}`", "", doc, "", "| key | type | default | description |", "|---|---|---|---|"]
    for f, opt in _opts(cls):
        if opt.kind.table is not None:
            sub_cls, sub_heading = opt.kind.table
            if sub_heading.startswith("["):  # a section of its own: no row here
                nested.append((sub_cls, sub_heading, opt.doc))
                continue
            nested.append((sub_cls, sub_heading, (sub_cls.__doc__ or "").strip()))
        out.append(f"| `{f.name}` | {opt.kind.doc_type} | {_render_default(f, opt)} | {opt.doc} |")
    out.append("")
    for sub in nested:
        _render_table(*sub, out)


def render_config_reference() -> str:
    """Render the key-by-key reference of the configuration file (Markdown).

    Returns:
        The text that ``docs/configuration.md`` holds between its
        ``<!-- BEGIN GENERATED -->`` and ``<!-- END GENERATED -->`` markers.
    """
    out: list[str] = []
    for f, opt in _opts(ProxyConfig):
        if opt.kind.table is None:  # a section with a schema of its own ([governance])
            out += [f"### `[{f.name}]`", "", f"{opt.doc} Default: {opt.default_doc}.", ""]
            continue
        _render_table(*opt.kind.table, opt.doc, out)
    return "\n".join(out)
