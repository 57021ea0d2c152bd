"""The listener: bind, accept with TLS, shut down; and ``run()`` for the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import resource
import ssl
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rendezvous import logs, runtime
from rendezvous.config import ClusterConfig, ServerConfig, TLSConfig
from rendezvous.errors import ConfigError, RendezvousError
from rendezvous.registry import Registry, open_registry
from rendezvous.server.connection import INTERNAL, Connection, LegBase, remember_sni
from rendezvous.server.hub import Hub
from rendezvous.server.leg import tune_listener
from rendezvous.server.memory import MemoryTrimmer
from rendezvous.server.revocation import RevocationWatch
from rendezvous.tls import server_ssl_context

if TYPE_CHECKING:
    from rendezvous.admin import AdminSite
    from rendezvous.server.acme_http import PlainHTTPListener
    from rendezvous.server.certificates import Certificate, CertificateManager, Challenges
    from rendezvous.server.cluster import ClusterMember
    from rendezvous.server.local import LocalRecords

# Seconds that active pairings get to finish after SIGINT/SIGTERM before they are cut.
SHUTDOWN_GRACE = 10.0
LISTEN_BACKLOG = 1024


class RendezvousServer:
    """A running rendezvous server: ``await start()``, then ``await close()``.

    Tests and embedding applications use it directly (``port=0`` picks a free port, see
    :attr:`port`); ``rendezvous serve`` wraps it in :func:`run`.
    """

    def __init__(self, config: ServerConfig, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else open_registry(config.registry_url)
        self._owns_registry = registry is None
        self.hub: Hub[LegBase] | None = None
        self.cluster: ClusterMember | None = None  # this node's membership, with --cluster
        self._revocation: RevocationWatch | None = None
        self._server: asyncio.Server | None = None
        self._trimmer: MemoryTrimmer | None = None
        self.admin: AdminSite | None = None  # the admin page, when config.admin asks for it
        self.local: LocalRecords | None = None  # relay.json and the status socket (data_dir)
        self.ssl_context: ssl.SSLContext | None = (
            server_ssl_context(config.tls) if config.tls is not None else None
        )
        # The pair SIGHUP reloads: config.tls; None once an ACME certificate is in use.
        self.tls_files = config.tls
        self.certificates: CertificateManager | None = None  # with config.acme
        self.plain_http: PlainHTTPListener | None = None  # with config.acme_http

    @property
    def port(self) -> int:
        """The port bound (useful when the config asked for port 0)."""
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def addresses(self) -> list[str]:
        """Every address listened on, as ``host:port``."""
        assert self._server is not None, "server not started"
        found = []
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return found

    async def start(self) -> None:
        """Bind and start accepting."""
        loop = asyncio.get_running_loop()
        config = self.config
        nonce_key = (hashlib.sha256(b"rendezvous nonces\0" + config.cluster.cluster_key.encode())
                     .digest() if config.cluster is not None else None)
        hub: Hub[LegBase] = Hub(self.registry, config.limits, loop, nonce_key=nonce_key)
        self.hub = hub
        hub.domain = config.domain
        hub.proxy_from = config.proxy_protocol_from
        hub.add_forwarded = config.forwarded
        if config.domain and self.ssl_context is not None:
            self.ssl_context.sni_callback = remember_sni  # (for 421 on a Host of another name)
        # Before the listener: no connection parks unwatched.
        self._revocation = RevocationWatch(hub, config.limits.registry_poll)
        self._revocation.start()
        # Accepted as plain TCP; each connection starts its own TLS handshake (with its own
        # deadline) once counted, so sockets in their handshake cannot escape the caps.
        if config.acme is not None:
            hub.challenges = self._start_acme()
        context = self.ssl_context
        factory: Callable[[], Connection] = lambda: Connection(hub, upgrade=context)  # noqa: E731
        try:
            self._server = await loop.create_server(
                factory,
                host=config.host or None,
                port=config.port,
                backlog=LISTEN_BACKLOG,
                reuse_address=True,
                start_serving=False,  # (options first: accepted sockets inherit them)
            )
            for sock in self._server.sockets:
                tune_listener(sock)
            await self._server.start_serving()
        except BaseException:
            await self._revocation.close()
            raise
        hub.start_sweeping()
        self._trimmer = MemoryTrimmer(loop, config.malloc_trim_interval,
                                      connections=lambda: hub.open_connections)
        self._trimmer.start()
        if config.cluster is not None:
            await self._join_cluster(hub, config.cluster)
        logs.event("listening", addresses=",".join(self.addresses),
                   tls="on" if self.ssl_context else "off", registry=self.registry.url)
        if config.data_dir is not None:
            from rendezvous.server.local import LocalRecords

            self.local = LocalRecords(config, hub, self.port, self.addresses)
            await self.local.start()
        if config.acme_http is not None:
            await self._start_plain_http(hub)
        if config.admin is not None:
            await self._start_admin()

    def _start_acme(self) -> Challenges:
        """Keep ACME certificates current: the stored main one at once if it is valid, else the
        self-signed one until the order is in; with --domain, one per named entry too (served
        by SNI). With --cluster they live in its Redis. Returns the challenges the listeners
        answer."""
        from rendezvous.server.certificates import (
            CertificateManager,
            Challenges,
            NamedContexts,
            open_store,
        )

        config = self.config
        assert config.acme is not None
        if self.ssl_context is None or config.data_dir is None:
            raise ConfigError("--acme needs TLS and a data folder")
        challenges = Challenges()
        named = NamedContexts(also=self.ssl_context.sni_callback)  # (remember_sni, with --domain)
        self.ssl_context.sni_callback = named.sni_callback
        node = config.cluster.node_id if config.cluster is not None else "relay"
        manager = CertificateManager(config.acme, open_store(config.data_dir, config.cluster),
                                     challenges, self.use_certificate_pem, node=node, named=named)
        if not manager.install_stored():
            logs.event("no certificate from the CA yet: serving the self-signed one until the "
                       "order succeeds", level=logging.WARNING, names=",".join(config.acme.names))
        wildcard = config.acme.wildcard
        if wildcard is not None and config.domain:  # the operator's *.DOMAIN: none per name
            named.use_wildcard(server_ssl_context(wildcard), config.domain)
        manager.start(None if named.wildcard else self.registry, config.domain,
                      config.limits.registry_poll)
        self.certificates = manager
        return challenges

    async def _start_plain_http(self, hub: Hub[LegBase]) -> None:
        """The --acme-http listener: HTTP-01 answers from the order's challenges (none pending
        without --acme) and redirects to this relay's TLS port."""
        from rendezvous.protocol.plainhttp import Site
        from rendezvous.server.acme_http import PlainHTTPListener
        from rendezvous.server.certificates import Challenges

        config = self.config
        assert config.acme_http is not None
        challenges = hub.challenges
        public_port = config.public.port if config.public is not None else None
        site = Site(hosts=config.acme_http.hosts, domain=config.domain,
                    https_port=public_port or self.port)
        listener = PlainHTTPListener(
            replace(config.acme_http, host=config.acme_http.host or config.host), site,
            challenges if isinstance(challenges, Challenges) else Challenges())
        try:
            await listener.start()
        except BaseException:
            await self.close(grace=0)
            raise
        self.plain_http = listener

    def use_certificate(self, cert_file: Path, key_file: Path) -> None:
        """Present this pair to new handshakes from now on (established connections, parked or
        paired, keep theirs); SIGHUP reloads it from then on."""
        self.tls_files = TLSConfig(cert_file=cert_file, key_file=key_file)
        self.reload_tls()

    def use_certificate_pem(self, certificate: Certificate) -> None:
        """Present an ACME certificate to new handshakes from now on (established connections
        keep theirs); SIGHUP keeps it (the certificate manager replaces it when due)."""
        from rendezvous.server.certificates import load_certificate

        assert self.ssl_context is not None
        load_certificate(self.ssl_context, certificate)
        self.tls_files = None

    async def _join_cluster(self, hub: Hub[LegBase], cluster: ClusterConfig) -> None:
        """Open the internal listener and register this node in the cluster's Redis (its
        module, and redis with it, is imported only here)."""
        from rendezvous.server.cluster import ClusterMember

        member = ClusterMember(
            cluster, loop=hub.loop, parked_count=hub.parked_count, parked_ids=hub.parked_ids,
            spawn=hub.spawn, handshake_timeout=hub.limits.head_timeout)
        try:
            await member.start(lambda: Connection(hub, INTERNAL))
        except BaseException:
            await member.close()
            await self.close(grace=0)
            raise
        self.cluster = hub.cluster = member
        hub.on_pool_change = member.pool_changed

    async def _start_admin(self) -> None:
        """Serve the admin page on this loop, next to the relay (imported only when asked)."""
        from rendezvous.admin import AdminSite

        assert self.config.admin is not None
        admin = AdminSite(self.config.admin, self.registry, self.hub,
                          relay_up=self.is_serving, relay_port=self.port)
        try:
            await admin.start()
        except BaseException:
            await self.close(grace=0)
            raise
        self.admin = admin

    def is_serving(self) -> bool:
        """Whether the relay's listener accepts connections (for /readyz)."""
        return self._server is not None and self._server.is_serving()

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, close parked connections, let active pairings finish for
        ``grace`` seconds, then release the registry."""
        if self.certificates is not None:
            certificates, self.certificates = self.certificates, None
            await certificates.close()
        if self.plain_http is not None:
            plain_http, self.plain_http = self.plain_http, None
            await plain_http.close()
        if self.admin is not None:
            admin, self.admin = self.admin, None
            await admin.close()
        if self.local is not None:
            local, self.local = self.local, None
            await local.close()
        if self._server is not None:
            self._server.close()
        if self._revocation is not None:
            revocation, self._revocation = self._revocation, None
            await revocation.close()
        if self._trimmer is not None:
            self._trimmer.stop()
        hub = self.hub
        if self.cluster is not None:
            member, self.cluster = self.cluster, None
            if hub is not None:
                hub.cluster = hub.on_pool_change = None
            await member.close()  # first, so other nodes stop sending us clients
        if hub is not None:
            hub.closing = True
            hub.stop_sweeping()
            hub.close_parked()
            deadline = hub.loop.time() + grace
            while hub.active_pairs > 0 and hub.loop.time() < deadline:
                await asyncio.sleep(0.05)
            hub.abort_all()
            hub.repeats.flush(everything=True)  # the counts of runs still open
        if self._owns_registry:
            await self.registry.close()
        if self._server is not None:
            # Python 3.12+ waits for connections here; bound it so a stuck peer can't hang us.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)

    def reload_tls(self, quiet: bool = False) -> str:
        """Load the certificate and key files again (SIGHUP), e.g. after a renewal; what
        happened, in a few words (logged unless ``quiet``).

        New handshakes use the new pair; established connections are not touched. A pair that
        fails to load is reported and the old one stays in use.
        """
        tls = self.tls_files
        if tls is None and self.certificates is not None:
            wildcard = self.certificates.named.wildcard
            files = self.config.acme.wildcard if self.config.acme is not None else None
            if wildcard is not None and files is not None:
                try:
                    wildcard.load_cert_chain(files.cert_file, files.key_file)
                except (OSError, ssl.SSLError) as exc:
                    logs.event("reload failed, keeping the old wildcard certificate",
                               level=logging.ERROR, cert=str(files.cert_file), error=str(exc))
            if not quiet:
                logs.event("reload: the ACME certificate stays (renewed when due)")
            return "kept (ACME)"
        if tls is None or self.ssl_context is None:
            if not quiet:
                logs.event("reload ignored: no TLS")
            return "none (no TLS)"
        try:
            self.ssl_context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            logs.event("reload failed, keeping the old certificate", level=logging.ERROR,
                       cert=str(tls.cert_file), error=str(exc))
            return "kept the old one (the new pair failed to load)"
        if not quiet:
            logs.event("reloaded certificate", cert=str(tls.cert_file))
        return "reloaded"

    def reload(self, new: ServerConfig) -> None:
        """Apply what ``new`` changes that can change while running (SIGHUP): the limits, the
        log level and the certificate files' contents; one log line says what changed and what
        differs but needs a restart (and stays as it was)."""
        old = self.config
        changed = _differences("", old.limits, new.limits)
        if old.log_level != new.log_level:
            changed.append(f"log_level={old.log_level}->{new.log_level}")
            logs.log.setLevel(logs.level_number(new.log_level))
        restart = [name for name in _RESTART_FIELDS
                   if getattr(old, name) != getattr(new, name)]
        self.config = replace(old, limits=new.limits, log_level=new.log_level)
        if self.hub is not None:
            self.hub.set_limits(new.limits)
        certificate = self.reload_tls(quiet=True)
        logs.event("reloaded", changed=",".join(changed) or "nothing",
                   restart_needed=",".join(restart) or "nothing", certificate=certificate)

    async def __aenter__(self) -> RendezvousServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(grace=0)


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; each connection needs one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


# What SIGHUP cannot change in a running relay: it logs them as needing a restart.
_RESTART_FIELDS = ("host", "port", "tls", "registry_url", "log_format", "use_uvloop", "cluster",
                   "admin", "data_dir", "public", "acme_http")


def _differences(prefix: str, old: object, new: object) -> list[str]:
    """``name=old->new`` for each field of two dataclasses that differs (nested ones too)."""
    found: list[str] = []
    for item in fields(old):  # type: ignore[arg-type]
        before, after = getattr(old, item.name), getattr(new, item.name)
        if before == after:
            continue
        if is_dataclass(before):
            found += _differences(f"{prefix}{item.name}.", before, after)
        else:
            found.append(f"{prefix}{item.name}={before}->{after}")
    return found


async def serve_until_signalled(
    config: ServerConfig, reload: Callable[[], ServerConfig] | None = None
) -> None:
    """Run the server until SIGINT or SIGTERM, then shut down gracefully. SIGHUP reloads the
    certificate, and with ``reload`` (which reads the settings again) the limits and log
    level too."""
    server = RendezvousServer(config)
    stop = asyncio.Event()

    def on_reload() -> None:
        if logs.reopen_log_files():  # logrotate moved it away
            logs.event("reopened log file")
        if reload is None:
            server.reload_tls()
            return
        try:
            new = reload()
        except RendezvousError as exc:
            logs.event("reload failed, keeping the current settings", level=logging.ERROR,
                       error=str(exc))
            return
        server.reload(new)

    # Handlers first: a SIGTERM sent as soon as the port answers must not kill us unlogged.
    with runtime.signals(stop.set, on_reload=on_reload):
        await server.start()
        try:
            await stop.wait()
        finally:
            logs.event("stopping", active_pairs=server.hub.active_pairs if server.hub else 0)
            await server.close()
            logs.event("stopped")


def run(config: ServerConfig, reload: Callable[[], ServerConfig] | None = None) -> int:
    """Run ``rendezvous serve`` to completion; returns the process exit status. ``reload``:
    the settings read again, on SIGHUP."""
    try:
        logs.configure_logging(config.log_format, logs.level_number(config.log_level),
                               log_file=config.log_file)
    except OSError as exc:
        print(f"rendezvous: error: cannot open the log file {config.log_file}: {exc}",
              file=sys.stderr)
        return 2
    limit = raise_open_file_limit()
    if limit < config.limits.max_connections + 64:
        logs.event("open-file limit below max connections", level=logging.WARNING,
                   limit=limit, max_connections=config.limits.max_connections)
    try:
        runtime.run(serve_until_signalled(config, reload), use_uvloop=config.use_uvloop)
    except OSError as exc:
        logs.flush()  # (the batched lines first, then why we stop)
        print(f"rendezvous: error: cannot listen on {config.host}:{config.port}: {exc}",
              file=sys.stderr)
        return 2
    finally:
        logs.flush()  # before a crash's traceback, too
    return 0
