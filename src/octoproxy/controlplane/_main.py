"""``octoproxy control-plane``: run one control-plane server until SIGTERM/SIGINT.

At start, in the state directory (``--state-dir``, mode 0700): the operator
token (``operator.token``, 0600, made at first start unless
``--operator-token-file`` names one), the CA (``ca.crt`` + ``ca.key`` 0600,
made at first start unless ``--ca-cert``/``--ca-key`` name the operator's),
with ``--tls`` the listener's own certificate, and ``admin.url`` (where
``octoproxy ctl`` finds the admin API). All file I/O runs in a thread.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import secrets
import signal
import ssl
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..common._admin import _parse_address, serve_admin
from ..identity import DEFAULT_LEAF_TTL, DEFAULT_TRUST_DOMAIN, CertificateAuthority, CertificateError, load_or_create_ca
from ._admin_api import admin_routes
from ._auth import Authenticator, default_state_dir
from ._embedded import EmbeddedStore
from ._etcd import EtcdStore
from ._server import (
    DEFAULT_MAX_CLIENT_MESSAGE,
    DEFAULT_MAX_REGISTRATIONS,
    DEFAULT_MAX_SESSIONS_PER_PEER,
    DISCOVERY_PATH,
    ControlPlaneServer,
)
from ._store import Store
from ..discovery._xds_server import DEFAULT_MAX_SUBSCRIPTION_BYTES, DEFAULT_MAX_SUBSCRIPTIONS

__all__ = ["serve", "run_from_cli", "Options", "tune_gc", "read_or_create_token"]

log = logging.getLogger("octoproxy.controlplane")


@dataclass
class Options:
    """Everything ``octoproxy control-plane`` takes besides the store (CLI flags of the same names)."""

    state_dir: str = field(default_factory=default_state_dir)
    operator_token_file: str | None = None
    insecure_no_auth: bool = False
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ca_cert: str | None = None
    ca_key: str | None = None
    cert_ttl: float = DEFAULT_LEAF_TTL
    tls: bool = False
    tls_san: tuple[str, ...] = ()
    allow_endpoint_cidr: tuple[str, ...] = ()
    max_registrations_per_session: int = DEFAULT_MAX_REGISTRATIONS
    max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS
    max_subscription_bytes: int = DEFAULT_MAX_SUBSCRIPTION_BYTES
    max_message_size: int = DEFAULT_MAX_CLIENT_MESSAGE
    max_sessions_per_peer: int = DEFAULT_MAX_SESSIONS_PER_PEER
    lease_grace: float = 2.0


def tune_gc() -> None:
    """Make the cyclic GC cheap for a server holding many long-lived sessions.

    With 1,000 subscribers a control plane holds ~230k tracked objects (Trio
    tasks, websocket state); every change's fan-out allocates enough to run
    dozens of young and a full collection every other change, which measured
    35-40 % of the fan-out CPU (bench/discovery.py). Freezing what exists at
    start-up and raising the thresholds (young 100k, full collections rare)
    keeps collections for real garbage: p99 push latency to 1,000
    subscribers went from ~350 ms to ~155 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 100, 10_000)


def read_or_create_token(path: str | os.PathLike[str], *, create: bool) -> str:
    """Read a bearer token from a file; make it (mode 0600) first if ``create`` and it is missing.

    Blocking: call it from a thread.

    Raises:
        OSError: if the file cannot be read or made.
        ValueError: if the file is empty, or readable by group or others.
    """
    p = Path(path)
    if create and not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it meanwhile: read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            log.debug("made the operator token %s (mode 0600)", p)  # (the ready line names the state dir)
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{p} is readable by others (mode {stat.filemode(mode)}): chmod 600 it")
    token = p.read_text().strip()
    if not token:
        raise ValueError(f"{p} is empty")
    return token


def _write_private(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def _server_tls(ca: CertificateAuthority, state: Path, hosts: list[str], ttl: float, ctx: ssl.SSLContext | None) -> ssl.SSLContext:
    """(Re)issue the listener's certificate and load it into ``ctx`` (a new one if ``None``).

    Blocking (files): call it from a thread. Loading a new chain into an
    existing context changes it for new connections only.
    """
    key_pem, issued = ca.issue_control_plane(hosts, time.time(), ttl)
    crt, key = state / "controlplane.crt", state / "controlplane.key"
    _write_private(key, key_pem)
    _write_private(crt, issued.chain_pem)
    if ctx is None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a client certificate authenticates; a token does too
        ctx.load_verify_locations(cadata=ca.trust_bundle_pem)
    ctx.load_cert_chain(str(crt), str(key))
    return ctx


async def _renew_tls(ca: CertificateAuthority, state: Path, hosts: list[str], ttl: float, ctx: ssl.SSLContext) -> None:
    while True:
        await trio.sleep(ttl * 2 / 3)
        try:
            await trio.to_thread.run_sync(_server_tls, ca, state, hosts, ttl, ctx)
            log.info("renewed the listener's TLS certificate")
        except (OSError, ssl.SSLError, CertificateError) as exc:
            log.error("renewing the listener's TLS certificate failed: %s (retrying in 60s)", exc)
            await trio.sleep(60)


async def serve(store: Store, listen: str, *, admin: str | None = None, options: Options | None = None) -> None:
    """Run ``store`` and a :class:`ControlPlaneServer` on ``listen`` until SIGTERM/SIGINT.

    Prints ``octoproxy control-plane ready listen=HOST:PORT`` on stdout once
    listening, then ``admin=ADDRESS`` when an admin address is given,
    ``state_dir=DIR`` and ``tls=1`` with ``--tls``.

    Args:
        store: the store to serve from (not yet running).
        listen: ``"host:port"`` of the WebSocket listener (port 0 picks one).
        admin: optional ``"host:port"`` / ``"unix:/path"`` of the admin API
            (:mod:`~octoproxy.controlplane._admin_api`).
        options: authentication, CA, TLS and limits.

    Raises:
        ValueError: if ``listen`` is malformed, or a token file is unusable.
        OSError: if binding fails or the state directory cannot be written.
        CertificateError: if the CA is unusable.
    """
    opts = options or Options()
    target = _parse_address(listen)
    if not isinstance(target, tuple):
        raise ValueError(f"--listen must be host:port, got {listen!r}")
    state = Path(opts.state_dir)
    await trio.to_thread.run_sync(functools.partial(state.mkdir, parents=True, exist_ok=True, mode=0o700))
    token_file = opts.operator_token_file or str(state / "operator.token")
    operator_token = await trio.to_thread.run_sync(
        functools.partial(read_or_create_token, token_file, create=opts.operator_token_file is None)
    )
    if opts.insecure_no_auth:
        log.warning(
            "AUTHENTICATION IS OFF (--insecure-no-auth): anyone who reaches %s can register, deregister "
            "and read every service. Never run this outside local development.", listen,
        )
    auth = Authenticator(operator_token, lambda: store.view.tokens, trust_domain=opts.trust_domain, insecure=opts.insecure_no_auth)
    ca = await trio.to_thread.run_sync(
        functools.partial(
            load_or_create_ca, opts.trust_domain, time.time(), state_dir=state, cert_file=opts.ca_cert, key_file=opts.ca_key
        )
    )
    server = ControlPlaneServer(
        store,
        auth=auth,
        ca=ca,
        leaf_ttl=opts.cert_ttl,
        allowed_networks=opts.allow_endpoint_cidr,
        max_registrations_per_session=opts.max_registrations_per_session,
        max_subscriptions=opts.max_subscriptions,
        max_subscription_bytes=opts.max_subscription_bytes,
        max_message_size=opts.max_message_size,
        max_sessions_per_peer=opts.max_sessions_per_peer,
        lease_grace=opts.lease_grace,
    )
    ssl_context = None
    hosts = [target[0], *opts.tls_san]
    if opts.tls:
        ssl_context = await trio.to_thread.run_sync(_server_tls, ca, state, hosts, DEFAULT_LEAF_TTL, None)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            host, port = await nursery.start(functools.partial(server.serve, *target, ssl_context=ssl_context))
            line = f"octoproxy control-plane ready listen={host}:{port}"
            if admin is not None:
                admin_addr = await nursery.start(serve_admin, admin, admin_routes(server))
                line += f" admin={admin_addr}"
                await trio.to_thread.run_sync(_write_private, state / "admin.url", f"http://{admin_addr}\n")
            line += f" state_dir={state}"
            if ssl_context is not None:
                line += " tls=1"
                nursery.start_soon(_renew_tls, ca, state, hosts, DEFAULT_LEAF_TTL, ssl_context)
            scheme = "wss" if ssl_context is not None else "ws"
            log.info("serving %s at %s://%s:%d%s", type(store).__name__, scheme, host, port, DISCOVERY_PATH)
            tune_gc()
            print(line, flush=True)
            async for signum in signals:
                log.info("received %s: exiting", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def run_from_cli(
    listen: str,
    *,
    store: str = "embedded",
    snapshot: str | None = None,
    etcd_endpoints: str = "http://127.0.0.1:2379",
    etcd_prefix: str = "/octoproxy/",
    etcd_ca_file: str | None = None,
    etcd_cert_file: str | None = None,
    etcd_key_file: str | None = None,
    admin: str | None = None,
    log_level: str = "info",
    options: Options | None = None,
) -> int:
    """Entry point of ``octoproxy control-plane``. Returns the exit status."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    backend: Store
    try:
        if store == "etcd":
            backend = EtcdStore(
                [u.strip() for u in etcd_endpoints.split(",") if u.strip()],
                prefix=etcd_prefix,
                ca_file=etcd_ca_file,
                cert_file=etcd_cert_file,
                key_file=etcd_key_file,
            )
        else:
            # join tokens live in the store: without a snapshot a restart would lock every proxy out
            state_dir = (options or Options()).state_dir
            backend = EmbeddedStore(snapshot if snapshot is not None else os.path.join(state_dir, "snapshot.json"))
        trio.run(functools.partial(serve, backend, listen, admin=admin, options=options))
    except (OSError, ValueError, CertificateError, ssl.SSLError) as exc:
        print(f"octoproxy control-plane: {exc}", file=sys.stderr)
        return 1
    return 0
