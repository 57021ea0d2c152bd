"""Certificates from an ACME CA (``serve --acme``): order, store, renew, and answer TLS-ALPN-01.

The ACME exchange itself is certbot's ``acme`` package (JWS, nonces, polling), run in a thread
because it is blocking. This module decides *when* to order (never while the stored certificate
is valid and not yet due, see :func:`renew_at`), keeps account key and certificate in
``DATA_DIR/acme/`` (keys 0600), and answers the CA's TLS-ALPN-01 validation (RFC 8737) on the
relay's own listener: while a challenge is pending, the relay reads each ClientHello before its
handshake (protocol/clienthello.py) and one whose SNI is the name and whose ALPN offers
``acme-tls/1`` gets a context whose certificate is the challenge certificate and whose only ALPN
protocol is ``acme-tls/1``; every other handshake, for that name too, gets the normal context
(which offers no ``acme-tls/1``). With ``serve --acme-http`` the order uses HTTP-01 instead,
answered from :class:`Challenges` by server/acme_http.py.

A failed order is logged with what to fix and retried with back-off; the certificate in use
(the stored one, or the self-signed one on a first start) keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from josepy.jwk import JWK, JWKRSA

from rendezvous import logs
from rendezvous.config import AcmeConfig

logger = logging.getLogger(__name__)

ACME_DIR = "acme"
ACCOUNT_KEY_FILE = "account-key.pem"
ACCOUNT_FILE = "account.json"
CERT_FILE = "cert.pem"  # the chain the CA issued, leaf first
KEY_FILE = "key.pem"
ALPN_ACME = "acme-tls/1"
# RFC 8737's id-pe-acmeIdentifier: the challenge certificate's (critical) proof extension.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
# The stored certificate is checked this often even when far from its renewal time, so a
# clock jump or a deleted file is noticed within a day.
MAX_SLEEP = 24 * 3600.0
USER_AGENT = "rendezvous-relay"
# Seconds an HTTP request to the CA may take.
NETWORK_TIMEOUT = 30


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
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with tempfile.TemporaryDirectory(prefix="rendezvous-acme-") as folder:
        cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_path.write_bytes(cert_pem)
        write_private(key_path, key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class Challenges:
    """Pending challenges, the one place every listener looks them up: TLS-ALPN-01 contexts by
    name (:meth:`context_for`, before the relay's handshake) and HTTP-01 key authorizations by
    token (:meth:`http_answer`, on the ``--acme-http`` listener).

    Written from the ordering thread, read on the event loop: a dict item set or popped is
    atomic, and a lock keeps compound updates whole.
    """

    def __init__(self) -> None:
        self._pending: dict[str, ssl.SSLContext] = {}
        self._http: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, name: str, digest: bytes) -> None:
        """Answer handshakes for ``name`` offering acme-tls/1 with a challenge certificate."""
        context = context_from_pem(*challenge_certificate(name, digest), alpn=[ALPN_ACME])
        with self._lock:
            self._pending[name.lower()] = context

    def remove(self, name: str) -> None:
        with self._lock:
            self._pending.pop(name.lower(), None)

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


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600 from the first byte), replacing it atomically."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(partial, path)


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


class AcmeError(Exception):
    """An order failed; the message says what to fix."""


def explain(exc: BaseException, config: AcmeConfig) -> str:
    """What went wrong in an order, and what the operator can do about it."""
    names = ", ".join(config.names)
    if isinstance(exc, AcmeError):
        return str(exc)
    if isinstance(exc, messages.Error):
        if exc.code == "rateLimited":
            return (f"the CA refuses more orders for now (rate limited): {exc.detail}; the relay "
                    "keeps its current certificate and retries later")
        if exc.code in ("connection", "dns", "unauthorized", "incorrectResponse", "tls"):
            return (f"the CA could not validate {names}: {exc.detail}; check that each name's "
                    "DNS record points at this relay and that the CA reaches its TLS port "
                    "(443 for a public CA)")
        return f"the CA refused: {exc}"
    if isinstance(exc, errors.TimeoutError | errors.ValidationError):
        return (f"validation of {names} did not succeed ({exc}); check that each name resolves "
                "to this relay and that its TLS port is reachable from the Internet")
    text = str(exc) or type(exc).__name__
    if "Max retries" in text or "Connection" in type(exc).__name__ or isinstance(exc, OSError):
        return (f"cannot reach the ACME directory {config.directory}: {text}; check the URL, "
                "this machine's network and DNS (and --acme-ca-bundle for a private CA)")
    return f"{type(exc).__name__}: {text}"


class CertificateManager:
    """Keeps a certificate from the CA in ``DATA_DIR/acme/`` current and hands it to ``install``.

    ``install(cert_path, key_path)`` is called on the event loop with each new (or, at start,
    stored) certificate. :meth:`start` runs the loop as a task; :meth:`renew_now` orders at
    once (tests, and an operator's ``--acme`` restart after changing names need no more).
    """

    def __init__(self, config: AcmeConfig, data_dir: Path, challenges_: Challenges,
                 install: Callable[[Path, Path], None]) -> None:
        self.config = config
        self.folder = data_dir / ACME_DIR
        self.challenges = challenges_
        self.install = install
        self.orders = 0  # orders this process placed (tests: a restart places none)
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._force = False

    @property
    def cert_path(self) -> Path:
        return self.folder / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.folder / KEY_FILE

    def stored(self) -> bytes | None:
        """The stored certificate if it covers the names and has not expired."""
        try:
            pem = self.cert_path.read_bytes()
            if not self.key_path.is_file():
                return None
            cert = x509.load_pem_x509_certificate(pem)
        except (OSError, ValueError):
            return None
        if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
            return None
        return pem if covers(pem, self.config.names) else None

    def start(self) -> None:
        """Order or renew in the background, now and whenever due."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def renew_now(self) -> None:
        """Order a new certificate now, valid stored one or not."""
        self._force = True
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, seconds))

    async def _run(self) -> None:
        retry = self.config.retry_first
        while True:
            pem = self.stored()
            if pem is not None and not self._force:
                due = renew_at(pem, self.config.renew_fraction)
                wait = (due - datetime.datetime.now(datetime.UTC)).total_seconds()
                if wait > 0:
                    await self._sleep(min(wait, MAX_SLEEP))
                    continue
            self._force = False
            logs.event("acme order", names=",".join(self.config.names),
                       directory=self.config.directory)
            try:
                await asyncio.to_thread(self._order)
            except Exception as exc:  # any failure: log what to fix, keep serving, retry
                self.last_error = explain(exc, self.config)
                logs.event("acme order failed", level=logging.ERROR, error=self.last_error,
                           retry_in=f"{retry:.0f}s",
                           serving="the stored certificate" if pem else "the self-signed one")
                await self._sleep(retry)
                retry = min(retry * 2, self.config.retry_max)
                continue
            retry = self.config.retry_first
            self.last_error = None
            self.install(self.cert_path, self.key_path)
            logs.event("acme certificate installed", names=",".join(self.config.names),
                       renew_at=renew_at(self.cert_path.read_bytes(),
                                         self.config.renew_fraction).isoformat())

    # The blocking part, in a thread ---------------------------------------------------

    def _network(self, key: JWK | None = None,
                 account: messages.RegistrationResource | None = None) -> client.ClientNetwork:
        verify = str(self.config.ca_bundle) if self.config.ca_bundle else True
        # requests takes a CA file where acme's annotation says bool.
        return client.ClientNetwork(key, account=account, verify_ssl=cast(bool, verify),
                                    user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)

    def _account_key(self) -> JWKRSA:
        path = self.folder / ACCOUNT_KEY_FILE
        if path.is_file():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            return JWKRSA(key=cast(rsa.RSAPrivateKey, loaded))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return JWKRSA(key=key)

    def _client(self) -> client.ClientV2:
        key = self._account_key()
        net = self._network(key)
        directory = client.ClientV2.get_directory(self.config.directory, net)
        acme = client.ClientV2(directory, net)
        account_path = self.folder / ACCOUNT_FILE
        if account_path.is_file():
            net.account = messages.RegistrationResource.json_loads(account_path.read_text())
            return acme
        contact = (f"mailto:{self.config.email}",) if self.config.email else ()
        registration = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
        regr = acme.new_account(registration)
        write_private(account_path, json.dumps(regr.to_json()).encode())
        return acme

    def _order(self) -> None:
        acme = self._client()
        account_key = acme.net.key
        assert account_key is not None
        cert_key = ec.generate_private_key(ec.SECP256R1())
        key_pem = cert_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        csr = crypto_util.make_csr(key_pem, list(self.config.names))
        order = acme.new_order(csr)
        answered: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # validated recently for this account: nothing to prove
                name = authz.body.identifier.value
                found = [c for c in authz.body.challenges if isinstance(c.chall, TLSALPN01)]
                if not found:
                    raise AcmeError(f"the CA offers no tls-alpn-01 challenge for {name}")
                challb = found[0]
                chall = cast(TLSALPN01, challb.chall)
                self.challenges.add(name, chall.validation(account_key))
                answered.append(name)
                acme.answer_challenge(challb, chall.response(account_key))
            # (acme compares with a naive local datetime.now())
            deadline = datetime.datetime.now() + datetime.timedelta(
                seconds=self.config.order_timeout)
            done = acme.poll_and_finalize(order, deadline)
        finally:
            for name in answered:
                self.challenges.remove(name)
        self.orders += 1
        write_private(self.key_path, key_pem)
        write_private(self.cert_path, done.fullchain_pem.encode("ascii"))
