"""Certificates from an ACME CA (``serve --acme``): order, store, share, renew, answer TLS-ALPN-01.

The ACME exchange itself is certbot's ``acme`` package (JWS, nonces, polling), run in a thread
because it is blocking. This module decides *when* to order (never while the stored certificate
is valid and not yet due, see :func:`renew_at`), keeps account and certificates in a
:class:`~rendezvous.server.certstore.CertificateStore` (``DATA_DIR/acme/``, or the cluster's
Redis), and answers the CA's TLS-ALPN-01 validation (RFC 8737) on the relay's own listener:
while a challenge is pending, the relay reads each ClientHello before its handshake
(protocol/clienthello.py) and one whose SNI is the name and whose ALPN offers ``acme-tls/1``
gets a context whose certificate is the challenge certificate and whose only ALPN protocol is
``acme-tls/1``; every other handshake, for that name too, gets the normal context (which offers
no ``acme-tls/1``). With ``serve --acme-http`` the order uses HTTP-01 instead, answered from
:class:`Challenges` by server/acme_http.py.

Certificates come in *slots*: :data:`MAIN` for the ``--public-host`` names, and with
``--domain D`` one per named entry (``NAME.D``), added and dropped as the registry's names
come and go (:meth:`CertificateManager.follow_names`; a handshake never causes an order) and
held back by the orders-per-hour limit. :meth:`NamedContexts.sni_callback`, on the relay's
context, hands a named host its own certificate.

In a cluster every node runs the same schedule; a node orders only under the store's lock and,
once it holds it, first looks whether another node stored a current certificate meanwhile. The
ordering node publishes its pending challenges; every node mirrors them into its own
:class:`Challenges` (:meth:`CertificateManager.follow_cluster`: Redis pub/sub, plus a full
comparison every ``sync_interval`` seconds in case a message was missed) and installs any new
certificate it learns of, so all nodes answer the CA and serve the same certificate.

A failed order is logged with what to fix and retried with back-off; the certificate in use
(the stored one, or the self-signed one on a first start) keeps serving meanwhile.

An order runs in a daemon thread of its own, not asyncio's executor (which the loop's end and
the interpreter's exit both wait for). At shutdown (:meth:`CertificateManager.close`) an order
in progress is abandoned: the event loop withdraws its challenges, releases the order lock and
logs it at once, and the thread stops at its next step (it polls the CA a second at a time) or,
stuck in a request to the CA, is left behind when the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from josepy.jwk import JWK, JWKRSA

from rendezvous import logs
from rendezvous.config import HTTP_01, TLS_ALPN_01, AcmeConfig, ClusterConfig
from rendezvous.errors import RegistryError
from rendezvous.protocol.hostnames import name_in
from rendezvous.server.certstore import (
    ACCOUNT,
    ACCOUNT_KEY,
    ACME_DIR,
    CHANNEL,
    MAIN,
    Certificate,
    CertificateStore,
    FileStore,
    RedisStore,
)
from rendezvous.tls import TLS12_CIPHERS, write_private

if TYPE_CHECKING:
    from rendezvous.registry import Registry

T = TypeVar("T")
SniCallback = Callable[[Any, Any, ssl.SSLContext], "int | None"]

logger = logging.getLogger(__name__)

__all__ = ["ACME_DIR", "MAIN", "Certificate", "CertificateManager", "Challenges",
           "NamedContexts", "open_store", "stored_main_files"]

ALPN_ACME = "acme-tls/1"
# RFC 8737's id-pe-acmeIdentifier: the challenge certificate's (critical) proof extension.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
# The stored certificates are checked this often even when far from their renewal time, so a
# clock jump or a deleted file is noticed within a day.
MAX_SLEEP = 24 * 3600.0
USER_AGENT = "rendezvous-relay"
# Seconds an HTTP request to the CA may take.
NETWORK_TIMEOUT = 30
# While another node holds the order lock, look again this often (its certificate usually
# arrives by pub/sub before that).
LOCK_RETRY = 2.0
# After the registry or the cluster's Redis fails, wait this long before following it again.
FOLLOW_RETRY = 1.0
# An order polls the CA in slices this long, looking in between whether it was abandoned.
POLL_SLICE = 1.0
# Challenge kinds, as the keys Challenges and the shared store know them by.
TLS_ALPN = TLS_ALPN_01
HTTP = HTTP_01


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The (empty) answer to a tls-alpn-01 challenge; ``acme`` 5 dropped its own class."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737's tls-alpn-01 challenge: present a certificate proving the key authorization."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **kwargs: Any) -> bytes:
        """The SHA-256 digest of the key authorization (the extension's content)."""
        return hashlib.sha256(self.key_authorization(account_key).encode("ascii")).digest()


def challenge_certificate(name: str, digest: bytes) -> tuple[bytes, bytes]:
    """A self-signed challenge certificate for ``name`` carrying ``digest`` (RFC 8737 §3), and
    its key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    der_octet_string = b"\x04" + bytes([len(digest)]) + digest
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, der_octet_string),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def context_from_pem(cert_pem: bytes, key_pem: bytes, alpn: list[str] | None) -> ssl.SSLContext:
    """A server SSLContext presenting ``cert_pem`` (ssl loads chains from files only, so they
    pass through a private temporary folder, removed at once)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)  # as the relay's own context (rendezvous.tls)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    load_certificate(ctx, Certificate(cert_pem, key_pem))
    return ctx


def load_certificate(ctx: ssl.SSLContext, certificate: Certificate) -> None:
    """Make ``ctx`` present ``certificate`` to new handshakes (through a private temporary
    folder, removed at once: ssl loads chains from files only). Raises ssl.SSLError or
    OSError when the pair does not load; ``ctx`` is unchanged then."""
    with tempfile.TemporaryDirectory(prefix="rendezvous-acme-") as folder:
        cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_path.write_bytes(certificate.cert_pem)
        write_private(key_path, certificate.key_pem)
        ctx.load_cert_chain(cert_path, key_path)


class NamedContexts:
    """The contexts of named hosts' own certificates, by ``NAME.DOMAIN``. A registered name
    whose certificate is not in yet gets the main certificate (browsers warn), logged once."""

    def __init__(self, also: SniCallback | None = None) -> None:
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._waiting: set[str] = set()
        self._told: set[str] = set()
        self._also = also
        self.wildcard: ssl.SSLContext | None = None  # the operator's *.DOMAIN certificate
        self.domain = ""

    def sni_callback(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                     context: ssl.SSLContext) -> None:
        """The relay context's SNI callback: a handshake for a named host with a certificate
        of its own is switched to it (after ``also``, the callback it replaces)."""
        if self._also is not None:
            self._also(sslobj, server_name, context)
        if server_name:
            found = self.get(server_name.lower().rstrip("."))
            if found is not None:
                sslobj.context = found

    def use_wildcard(self, context: ssl.SSLContext, domain: str) -> None:
        """Serve every ``NAME.domain`` with ``context`` (the operator's wildcard certificate)."""
        self.wildcard, self.domain = context, domain

    def get(self, name: str) -> ssl.SSLContext | None:
        """The context for a handshake asking for ``name`` (lower case), None for the main."""
        if self.wildcard is not None:
            return self.wildcard if name_in(name, self.domain) is not None else None
        found = self._contexts.get(name)
        if found is None and name in self._waiting and name not in self._told:
            self._told.add(name)
            logs.event("no certificate for this name yet: its visitors get the main certificate "
                       "(browsers warn) until it is in", level=logging.WARNING, name=name)
        return found

    def wait(self, name: str) -> None:
        """``name`` is registered; its certificate will come."""
        if name not in self._contexts:
            self._waiting.add(name)

    def set(self, name: str, context: ssl.SSLContext) -> None:
        self._contexts[name] = context
        self._waiting.discard(name)
        self._told.discard(name)

    def drop(self, name: str) -> None:
        self._contexts.pop(name, None)
        self._waiting.discard(name)
        self._told.discard(name)

    def names(self) -> list[str]:
        """The names with a certificate of their own."""
        return sorted(self._contexts)


class Challenges:
    """Pending challenges, the one place every listener looks them up: TLS-ALPN-01 contexts by
    name (:meth:`context_for`, before the relay's handshake) and HTTP-01 key authorizations by
    token (:meth:`http_answer`, on the ``--acme-http`` listener).

    Written from the ordering thread and the cluster mirror, read on the event loop: a dict
    item set or popped is atomic, and a lock keeps compound updates whole.
    """

    def __init__(self) -> None:
        self._pending: dict[str, ssl.SSLContext] = {}
        self._digests: dict[str, bytes] = {}
        self._http: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, name: str, digest: bytes) -> None:
        """Answer handshakes for ``name`` offering acme-tls/1 with a challenge certificate."""
        name = name.lower()
        with self._lock:
            if self._digests.get(name) == digest:
                return  # the same challenge, seen again (the ordering node mirrors its own)
        context = context_from_pem(*challenge_certificate(name, digest), alpn=[ALPN_ACME])
        with self._lock:
            self._pending[name] = context
            self._digests[name] = digest

    def remove(self, name: str) -> None:
        with self._lock:
            self._pending.pop(name.lower(), None)
            self._digests.pop(name.lower(), None)

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    @property
    def alpn_pending(self) -> bool:
        """Whether any TLS-ALPN-01 challenge is pending: only then does the relay read a
        ClientHello before its handshake (checked on every accept, so a plain attribute read)."""
        return bool(self._pending)

    def context_for(self, server_name: str | None, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
        """The challenge context for a ClientHello, or None for the normal one: only a
        handshake whose SNI has a pending challenge AND whose ALPN offers acme-tls/1 (the CA's,
        RFC 8737 §3) gets it; a visitor of that name meanwhile gets the real certificate."""
        if server_name is None or ALPN_ACME not in alpn:
            return None
        return self._pending.get(server_name.lower().rstrip("."))

    def add_http(self, token: str, key_authorization: str) -> None:
        """Answer ``GET /.well-known/acme-challenge/TOKEN`` with ``key_authorization``."""
        self._http[token] = key_authorization

    def remove_http(self, token: str) -> None:
        self._http.pop(token, None)

    def http_answer(self, token: str) -> str | None:
        """The key authorization for an HTTP-01 token, or None if none is pending."""
        return self._http.get(token)


def renew_at(cert_pem: bytes, fraction: float) -> datetime.datetime:
    """When a certificate is due for renewal: ``fraction`` of its lifetime after its start."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * fraction


def covers(cert_pem: bytes, names: tuple[str, ...]) -> bool:
    """Whether the certificate's DNS names include every one of ``names``."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    return all(n.lower() in have for n in names)


class OrderAbandoned(Exception):
    """The relay is stopping: the order in progress stops at its next step."""


class AcmeError(Exception):
    """An order failed; the message says what to fix."""


def explain(exc: BaseException, config: AcmeConfig, names_: tuple[str, ...] = ()) -> str:
    """What went wrong in an order for ``names_`` (default: the main names), and what the
    operator can do about it."""
    names = ", ".join(names_ or config.names)
    if isinstance(exc, AcmeError):
        return str(exc)
    if type(exc).__module__.startswith("redis"):
        return (f"the cluster's redis failed ({type(exc).__name__}: {exc}); the certificates "
                "in use stay, and the relay tries again")
    if isinstance(exc, messages.Error):
        if exc.code == "rateLimited":
            return (f"the CA refuses more orders for now (rate limited): {exc.detail}; the relay "
                    "keeps its current certificate and retries later")
        if exc.code in ("connection", "dns", "unauthorized", "incorrectResponse", "tls"):
            port = ("its --acme-http port (80 for a public CA)" if config.challenge == HTTP
                    else "its TLS port (443 for a public CA)")
            return (f"the CA could not validate {names}: {exc.detail}; check that each name's "
                    f"DNS record points at this relay and that the CA reaches {port}")
        return f"the CA refused: {exc}"
    if isinstance(exc, errors.TimeoutError | errors.ValidationError):
        return (f"validation of {names} did not succeed ({exc}); check that each name resolves "
                "to this relay and that its TLS port is reachable from the Internet")
    text = str(exc) or type(exc).__name__
    if "Max retries" in text or "Connection" in type(exc).__name__ or isinstance(exc, OSError):
        return (f"cannot reach the ACME directory {config.directory}: {text}; check the URL, "
                "this machine's network and DNS (and --acme-ca-bundle for a private CA)")
    return f"{type(exc).__name__}: {text}"


@dataclass(frozen=True, slots=True)
class Pending:
    """A challenge the relay answers: its kind, its key (the name for TLS-ALPN-01, the token
    for HTTP-01), its value (the key authorization's digest, hex, or the key authorization)."""

    kind: str
    key: str
    value: str
    challb: messages.ChallengeBody
    response: challenges.ChallengeResponse

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.key}"


@dataclass(slots=True)
class Slot:
    """One certificate the relay keeps current: :data:`MAIN`, or a named host ``NAME.DOMAIN``."""

    key: str
    names: tuple[str, ...]
    retry: float
    fingerprint: str | None = None  # of the certificate installed, None before there is one
    due: float = 0.0  # epoch seconds: when to look at it again (0: at once)
    force: bool = False  # order even though the stored certificate is current
    held_back: bool = False  # waiting for the orders-per-hour limit (logged once)
    error: str | None = None  # why the last order failed


def usable(certificate: Certificate, names: tuple[str, ...]) -> bool:
    """Whether ``certificate`` parses, covers ``names`` and has not expired."""
    try:
        cert = x509.load_pem_x509_certificate(certificate.cert_pem)
    except ValueError:
        return False
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        return False
    return covers(certificate.cert_pem, names)


class CertificateManager:
    """Keeps the certificates of the relay's slots current in ``store`` and installed.

    ``install(certificate)`` is called on the event loop with each new (or, at start, stored)
    main certificate; named hosts' certificates go to ``named`` (whose SNI callback serves
    them). :meth:`start` runs the schedule (and, for a shared store, the cluster mirror) as tasks;
    :meth:`follow_names` adds and drops named hosts' slots; :meth:`renew_now` orders at once.
    ``node`` names the lock's owner in a cluster.
    """

    def __init__(self, config: AcmeConfig, store: CertificateStore, challenges_: Challenges,
                 install: Callable[[Certificate], None], node: str = "relay",
                 named: NamedContexts | None = None) -> None:
        self.config = config
        self.store = store
        self.challenges = challenges_
        self.named = named if named is not None else NamedContexts()
        self.install = install
        self.node = node
        self.slots: dict[str, Slot] = {MAIN: Slot(MAIN, config.names, config.retry_first)}
        self.orders = 0  # orders this process placed (tests: a restart places none)
        self.ordered: list[str] = []  # the slots of those orders, in order
        self.held: list[str] = []  # slots the orders-per-hour limit made wait, in order
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        # Set by close(): an order thread still running stops at its next step.
        self._abandon = threading.Event()
        self._mirrored: dict[str, str] = {}  # challenges copied from the cluster

    @property
    def last_error(self) -> str | None:
        """Why the main certificate's last order failed (None once one succeeded)."""
        return self.slots[MAIN].error

    def install_stored(self) -> bool:
        """Install the stored main certificate if it is usable (blocking: at start, before the
        listener opens); whether there was one."""
        try:
            stored = self.store.load(MAIN)
        except Exception as exc:  # the cluster's Redis down: start anyway, retry later
            logs.event("acme: cannot read the stored certificate", level=logging.ERROR,
                       store=self.store.shown, error=explain(exc, self.config))
            return False
        if stored is None or not usable(stored, self.config.names):
            return False
        self._install(self.slots[MAIN], stored)
        return True

    def start(self, registry: Registry | None = None, domain: str = "",
              interval: float = 1.0) -> None:
        """Order or renew in the background, now and whenever due; with ``registry`` and
        ``domain``, also one certificate per named entry (:meth:`follow_names`)."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run()))
        if registry is not None and domain:
            self._tasks.append(loop.create_task(self.follow_names(registry, domain, interval)))
        if isinstance(self.store, RedisStore):
            self._tasks.append(loop.create_task(self.follow_cluster(self.store)))

    def renew_now(self, slot: str = MAIN) -> None:
        """Order a new certificate for ``slot`` now, valid stored one or not."""
        found = self.slots[slot]
        found.force = True
        found.due = 0.0
        self._wake.set()

    async def close(self) -> None:
        """Stop the schedule; an order in progress is abandoned (see the module's docstring),
        so this returns without waiting for the CA."""
        self._abandon.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.store.close)

    # The schedule --------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, seconds))

    async def _run(self) -> None:
        while True:
            now = time.time()
            due = [slot for slot in self.slots.values() if slot.due <= now]
            if not due:
                soonest = min(slot.due for slot in self.slots.values())
                await self._sleep(min(soonest - now, MAX_SLEEP))
                continue
            for slot in due:  # MAIN first (dicts keep order), then names as they came
                if self.slots.get(slot.key) is slot:  # not dropped meanwhile
                    try:
                        await self._handle(slot)
                    except Exception as exc:  # the store failed (Redis unreachable): later
                        self._failed(slot, exc)

    async def _handle(self, slot: Slot) -> None:
        """Install the stored certificate of ``slot`` if usable; order one if due (under
        the store's lock, within the orders-per-hour limit)."""
        if await self._take_stored(slot):
            return
        if not await asyncio.to_thread(self.store.acquire, self.node, self.config.lock_ttl):
            slot.due = time.time() + LOCK_RETRY  # another node orders; its result comes
            return
        try:
            if await self._take_stored(slot):  # stored by the node that held the lock before
                return
            if slot.key != MAIN and await self._held_back(slot):
                return
            now = time.time()
            await asyncio.to_thread(self.store.record_order, now,
                                    now - self.config.orders_window)
            logs.event("acme order", names=",".join(slot.names), directory=self.config.directory,
                       store=self.store.shown)
            posted: list[Pending] = []  # the order thread's challenges, as it posts them
            try:
                certificate = await self._while_locked(
                    in_daemon_thread(lambda: self._order(slot.names, posted)))
            except asyncio.CancelledError:
                await self._abandoned(slot, posted)
                raise
            await asyncio.to_thread(self.store.save, slot.key, certificate)
        except Exception as exc:  # any failure: log what to fix, keep serving, retry
            self._failed(slot, exc)
            return
        finally:
            with contextlib.suppress(Exception):  # else it expires by itself
                await asyncio.to_thread(self.store.release, self.node)
        self.orders += 1
        self.ordered.append(slot.key)
        slot.force = slot.held_back = False
        slot.error = None
        slot.retry = self.config.retry_first
        if self.slots.get(slot.key) is not slot:  # its name went while the order ran
            await asyncio.to_thread(self.store.delete, slot.key)
            return
        self._install(slot, certificate)

    async def _take_stored(self, slot: Slot) -> bool:
        """Install the stored certificate if usable; whether no order is needed now."""
        stored = await asyncio.to_thread(self.store.load, slot.key)
        if stored is None or not usable(stored, slot.names):
            return False
        self._install(slot, stored)  # even when due: a valid certificate never lapses
        return not slot.force and slot.due > time.time()

    async def _held_back(self, slot: Slot) -> bool:
        """Whether the orders-per-hour limit makes ``slot`` wait (then it is rescheduled)."""
        window, limit = self.config.orders_window, self.config.orders_per_hour
        now = time.time()
        recent = await asyncio.to_thread(self.store.recent_orders, now - window)
        if len(recent) < limit:
            return False
        slot.due = recent[len(recent) - limit] + window
        if not slot.held_back:
            slot.held_back = True
            self.held.append(slot.key)
            logs.event("acme orders per hour reached: this name waits", level=logging.WARNING,
                       name=slot.key, limit=limit,
                       until=datetime.datetime.fromtimestamp(slot.due, datetime.UTC).isoformat())
        return True

    async def _abandoned(self, slot: Slot, posted: list[Pending]) -> None:
        """The relay stops during the order of ``slot``: take its challenges back and give
        the lock back here (its thread may be stuck in a request to the CA), and say so."""
        self._abandon.set()
        with contextlib.suppress(Exception):  # they expire by themselves
            await asyncio.to_thread(self._withdraw, list(posted))
        lock = "none"  # a lone relay's store has no lock
        if self.store.shared:
            try:
                await asyncio.to_thread(self.store.release, self.node)
                lock = "released"
            except Exception:
                lock = "left to expire"
        logs.event("acme order abandoned: the relay is stopping", level=logging.WARNING,
                   names=",".join(slot.names), challenges_withdrawn=len(posted), lock=lock)

    def _failed(self, slot: Slot, exc: BaseException) -> None:
        slot.error = explain(exc, self.config, slot.names)
        logs.event("acme order failed", level=logging.ERROR, names=",".join(slot.names),
                   error=slot.error, retry_in=f"{slot.retry:.0f}s",
                   serving="its current certificate" if slot.fingerprint else
                   ("the self-signed one" if slot.key == MAIN else "the main certificate"))
        slot.due = time.time() + slot.retry
        slot.retry = min(slot.retry * 2, self.config.retry_max)

    async def _while_locked(self, work: Awaitable[T]) -> T:
        """Await ``work``, extending the order lock every third of its lifetime meanwhile."""
        task = asyncio.ensure_future(work)
        ttl = self.config.lock_ttl
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=ttl / 3)
                if task in done:
                    return task.result()
                if not await asyncio.to_thread(self.store.refresh, self.node, ttl):
                    logs.event("acme order lock lost (Redis slow or restarted?): another node "
                               "may order too", level=logging.WARNING, node=self.node)
        finally:
            task.cancel()  # (cancelled here: what the work yields later goes nowhere)

    def _install(self, slot: Slot, certificate: Certificate) -> None:
        """Serve ``certificate`` for ``slot`` from the next handshake on (a no-op when it is
        the one in use), and schedule its renewal."""
        slot.due = renew_at(certificate.cert_pem, self.config.renew_fraction).timestamp()
        if slot.fingerprint == certificate.fingerprint:
            return
        try:
            if slot.key == MAIN:
                self.install(certificate)
            else:
                self.named.set(slot.key, context_from_pem(certificate.cert_pem,
                                                          certificate.key_pem, alpn=None))
        except (ssl.SSLError, OSError, ValueError) as exc:
            logs.event("acme certificate unusable, ordering a new one", level=logging.ERROR,
                       names=",".join(slot.names), error=str(exc))
            slot.force, slot.due = True, time.time() + slot.retry
            return
        slot.fingerprint = certificate.fingerprint
        logs.event("acme certificate installed", names=",".join(slot.names),
                   renew_at=datetime.datetime.fromtimestamp(slot.due, datetime.UTC).isoformat())

    # Named hosts ---------------------------------------------------------------------

    async def follow_names(self, registry: Registry, domain: str, interval: float) -> None:
        """Keep one slot per named entry (``NAME.domain``), as the registry's watch reports
        names added, renamed and removed (``interval``: for backends that poll)."""
        named: dict[str, str] = {}  # ID -> name
        first = True
        failing = False
        while True:
            try:
                async for changes in registry.watch(interval):
                    if changes.everything:
                        named = {e.uuid: e.name for e in await registry.list() if e.name}
                    for uuid in changes.ids:
                        entry = await registry.get(uuid)
                        if entry is not None and entry.name:
                            named[uuid] = entry.name
                        else:
                            named.pop(uuid, None)
                    await self.want({f"{name}.{domain}" for name in named.values()},
                                    cleanup=first)
                    first = failing = False
            except RegistryError as exc:
                if not failing:
                    logs.event("acme: registry watch failed, named certificates wait",
                               level=logging.WARNING, error=str(exc))
                failing = True
            except Exception:  # a bug here must not stop named certificates for good
                logs.log.exception("acme: following the registry's names failed")
                failing = True
            await asyncio.sleep(FOLLOW_RETRY)

    async def want(self, hosts: set[str], cleanup: bool = False) -> None:
        """Keep certificates for exactly these named ``hosts``: new ones are ordered (or taken
        from the store), gone ones dropped from the store and the SNI table. ``cleanup``: also
        drop stored certificates of names removed while the relay was down."""
        have = {key for key in self.slots if key != MAIN}
        added = sorted(hosts - have)
        for host in added:
            self.slots[host] = Slot(host, (host,), self.config.retry_first)
            self.named.wait(host)
        gone = have - hosts
        for host in sorted(gone):
            del self.slots[host]
            self.named.drop(host)
            logs.event("acme certificate dropped (name removed)", name=host)
        if cleanup:
            gone |= {slot for slot in await asyncio.to_thread(self.store.slots)
                     if slot != MAIN and slot not in hosts}
        for host in sorted(gone):
            await asyncio.to_thread(self.store.delete, host)
        if added:
            self._wake.set()

    # The cluster ---------------------------------------------------------------------

    async def follow_cluster(self, store: RedisStore) -> None:
        """Mirror the challenges other nodes publish and install the certificates they store:
        told at once by pub/sub, and compared in full every ``sync_interval`` seconds (after
        a missed message, a new certificate is in use within that long)."""
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        loop = asyncio.get_running_loop()
        failing = False
        while True:
            listener = aioredis.Redis.from_url(store.url, socket_connect_timeout=5,
                                               socket_timeout=self.config.sync_interval + 5)
            pubsub = listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                await self.sync_cluster(store)
                if failing:
                    logs.event("acme: cluster redis reachable again", node=self.node)
                failing = False
                next_sync = loop.time() + self.config.sync_interval
                while True:
                    message = await pubsub.get_message(timeout=self.config.sync_interval)
                    if message is not None and isinstance(message.get("data"), bytes):
                        await self._on_event(store, message["data"].decode("ascii", "replace"))
                    if loop.time() >= next_sync:
                        await self.sync_cluster(store)
                        next_sync = loop.time() + self.config.sync_interval
            except (RedisError, OSError) as exc:
                if not failing:
                    logs.event("acme: cluster redis unreachable, certificates kept",
                               level=logging.WARNING, node=self.node, error=str(exc))
                failing = True
            except Exception:  # a bug here must not end the mirror for good
                logs.log.exception("acme: following the cluster failed")
                failing = True
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(RedisError, OSError):
                    await listener.aclose()
            await asyncio.sleep(FOLLOW_RETRY)

    async def _on_event(self, store: RedisStore, event: str) -> None:
        what, _, arg = event.partition(" ")
        if what == "challenges":
            await self._mirror_challenges(store)
            if arg != "-":
                await asyncio.to_thread(store.acknowledge, arg, self.node)
        elif what in ("certificate", "dropped"):
            await self._take_shared(store, arg)

    async def sync_cluster(self, store: RedisStore) -> None:
        """Compare everything with the cluster's Redis: challenges and certificates."""
        await self._mirror_challenges(store)
        fingerprints = await asyncio.to_thread(store.fingerprints)
        for key, slot in list(self.slots.items()):
            if fingerprints.get(key, slot.fingerprint) != slot.fingerprint:
                await self._take_shared(store, key)

    async def _take_shared(self, store: RedisStore, key: str) -> None:
        slot = self.slots.get(key)
        if slot is None:
            return
        stored = await asyncio.to_thread(store.load, key)
        if stored is not None and usable(stored, slot.names):
            self._install(slot, stored)

    async def _mirror_challenges(self, store: RedisStore) -> None:
        pending = await asyncio.to_thread(store.challenges)
        for field, value in pending.items():
            if self._mirrored.get(field) == value:
                continue
            kind, _, key = field.partition(":")
            if kind == TLS_ALPN:
                await asyncio.to_thread(self.challenges.add, key, bytes.fromhex(value))
            elif kind == HTTP:
                self.challenges.add_http(key, value)
            else:
                continue
            self._mirrored[field] = value
        for field in [f for f in self._mirrored if f not in pending]:
            del self._mirrored[field]
            kind, _, key = field.partition(":")
            if kind == TLS_ALPN:
                self.challenges.remove(key)
            else:
                self.challenges.remove_http(key)

    # The blocking part, in a thread ---------------------------------------------------

    def _network(self, key: JWK | None = None,
                 account: messages.RegistrationResource | None = None) -> client.ClientNetwork:
        verify = str(self.config.ca_bundle) if self.config.ca_bundle else True
        # requests takes a CA file where acme's annotation says bool.
        return client.ClientNetwork(key, account=account, verify_ssl=cast(bool, verify),
                                    user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)

    def _account_key(self) -> JWKRSA:
        stored = self.store.read(ACCOUNT_KEY)
        if stored is not None:
            loaded = serialization.load_pem_private_key(stored, password=None)
            return JWKRSA(key=cast(rsa.RSAPrivateKey, loaded))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.store.write(ACCOUNT_KEY, key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        return JWKRSA(key=key)

    def _client(self) -> client.ClientV2:
        key = self._account_key()
        net = self._network(key)
        directory = client.ClientV2.get_directory(self.config.directory, net)
        acme = client.ClientV2(directory, net)
        account = self.store.read(ACCOUNT)
        if account is not None:
            net.account = messages.RegistrationResource.json_loads(account.decode())
            return acme
        contact = (f"mailto:{self.config.email}",) if self.config.email else ()
        registration = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
        regr = acme.new_account(registration)
        self.store.write(ACCOUNT, json.dumps(regr.to_json()).encode())
        return acme

    def _answer(self, authz: messages.AuthorizationResource, account_key: JWK) -> Pending:
        """Which challenge of ``authz`` the relay answers, and with what (the one place that
        choice is made): HTTP-01 on the ``--acme-http`` listener when it runs (port 443 may
        sit behind something else), else TLS-ALPN-01 on the relay's own listener."""
        name = authz.body.identifier.value
        kind = self.config.challenge
        for challb in authz.body.challenges:
            chall = challb.chall
            if kind == HTTP and isinstance(chall, challenges.HTTP01):
                response, validation = chall.response_and_validation(account_key)
                return Pending(HTTP, chall.encode("token"), validation, challb, response)
            if kind == TLS_ALPN and isinstance(chall, TLSALPN01):
                return Pending(TLS_ALPN, name, chall.validation(account_key).hex(), challb,
                               chall.response(account_key))
        raise AcmeError(f"the CA offers no {kind} challenge for {name}")

    def _post(self, pending: Pending) -> None:
        """Serve ``pending`` here, and (in a cluster) on every node, before the CA looks."""
        if pending.kind == TLS_ALPN:
            self.challenges.add(pending.key, bytes.fromhex(pending.value))
        else:
            self.challenges.add_http(pending.key, pending.value)
        self.store.share_challenges({pending.field: pending.value},
                                    ttl=self.config.order_timeout + LOCK_RETRY)

    def _withdraw(self, posted: list[Pending]) -> None:
        for pending in posted:
            if pending.kind == TLS_ALPN:
                self.challenges.remove(pending.key)
            else:
                self.challenges.remove_http(pending.key)
        try:
            self.store.withdraw_challenges([p.field for p in posted])
        except Exception as exc:  # they expire by themselves
            logs.event("acme: could not withdraw shared challenges", level=logging.WARNING,
                       error=str(exc))

    def _go_on(self) -> None:
        """Raise OrderAbandoned once the relay is stopping (looked at between the steps)."""
        if self._abandon.is_set():
            raise OrderAbandoned("the relay is stopping")

    def _order(self, names: tuple[str, ...], posted: list[Pending]) -> Certificate:
        """Order a certificate for ``names``; each challenge answered goes into ``posted``
        first (the event loop withdraws them should the order be abandoned)."""
        self._go_on()
        acme = self._client()
        account_key = acme.net.key
        assert account_key is not None
        cert_key = ec.generate_private_key(ec.SECP256R1())
        key_pem = cert_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        csr = crypto_util.make_csr(key_pem, list(names))
        self._go_on()
        order = acme.new_order(csr)
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # validated recently for this account: nothing to prove
                pending = self._answer(authz, account_key)
                self._go_on()
                posted.append(pending)
                self._post(pending)
                acme.answer_challenge(pending.challb, pending.response)
            # (acme compares with a naive local datetime.now())
            deadline = datetime.datetime.now() + datetime.timedelta(
                seconds=self.config.order_timeout)
            done = self._poll_and_finalize(acme, order, deadline)
        finally:
            if not self._abandon.is_set():  # (abandoned: the event loop withdrew them)
                self._withdraw(posted)
        return Certificate(done.fullchain_pem.encode("ascii"), key_pem)

    def _poll_and_finalize(self, acme: client.ClientV2, order: messages.OrderResource,
                           deadline: datetime.datetime) -> messages.OrderResource:
        """acme's poll_and_finalize, in slices of POLL_SLICE: an abandoned order stops
        polling within about a slice."""
        order = self._in_slices(lambda until: acme.poll_authorizations(order, until), deadline)
        try:
            acme.begin_finalization(order)
        except messages.Error as exc:
            if exc.code != "orderNotReady":  # (not ready yet: the polling below finalizes)
                raise
        return self._in_slices(lambda until: acme.poll_finalization(order, until), deadline)

    def _in_slices(self, poll: Callable[[datetime.datetime], T],
                   deadline: datetime.datetime) -> T:
        """``poll(until)`` again and again with short deadlines until it answers, the order is
        abandoned (OrderAbandoned) or ``deadline`` passes (acme's TimeoutError)."""
        while True:
            self._go_on()
            now = datetime.datetime.now()
            if now >= deadline:
                raise errors.TimeoutError()
            with contextlib.suppress(errors.TimeoutError):  # (this slice's)
                return poll(min(deadline, now + datetime.timedelta(seconds=POLL_SLICE)))


def in_daemon_thread(work: Callable[[], T]) -> asyncio.Future[T]:
    """``work()`` in a daemon thread of its own, as a future of the running loop. Unlike
    asyncio.to_thread's executor, which the loop's end and the interpreter's exit join, a
    thread left stuck (an abandoned order waiting on the CA) cannot hold up the exit; its
    result, should it come after the loop closed, goes nowhere."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits for it
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(T, result))

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="acme-order", daemon=True).start()
    return future


def open_store(data_dir: Path, cluster: ClusterConfig | None) -> CertificateStore:
    """The cluster's Redis with ``cluster``, else ``DATA_DIR/acme/``."""
    if cluster is not None:
        return RedisStore(cluster.redis_url, shown="the cluster's redis")
    return FileStore(data_dir / ACME_DIR)


def stored_main_files(config: AcmeConfig, data_dir: Path) -> tuple[Path, Path] | None:
    """The files of a lone relay's stored main certificate, if it is usable."""
    store = FileStore(data_dir / ACME_DIR)
    stored = store.load(MAIN)
    if stored is None or not usable(stored, config.names):
        return None
    return store.files(MAIN)
