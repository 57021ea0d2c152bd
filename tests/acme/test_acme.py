"""serve --acme against a real ACME server: Debian's pebble, with pebble-challtestsrv as its DNS
(every name resolves to 127.0.0.1), validating TLS-ALPN-01 on the relay's own port."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from harness import HiddenHTTPService, ServerThread, recv_until
from pebble_support import Pebble, run_pebble
from requests.adapters import HTTPAdapter
from requests.auth import HTTPDigestAuth
from support import free_port

from rendezvous.config import AcmeConfig, ServerConfig, TLSConfig
from rendezvous.server.certificates import ACME_IDENTIFIER_OID, ALPN_ACME, Challenges
from rendezvous.tls import ensure_self_signed

NAME = "relay.test"
DER = Encoding.DER

pytestmark = pytest.mark.skipif(shutil.which("pebble") is None,
                                reason="Debian's pebble package is not installed")


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    yield from run_pebble(tmp_path)



class AcmeServer(ServerThread):
    """A relay whose clients (the hidden service's parked connections) trust pebble's root and
    reach it by its certified name."""

    root_pem: str

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.root_pem)

    def connect(self, timeout: float = 5.0, source: str | None = None) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return self.client_context().wrap_socket(raw, server_hostname=NAME)


def start_relay(pebble: Pebble, data_dir: Path) -> AcmeServer:
    config = ServerConfig(
        host="127.0.0.1", port=pebble.tls_port, registry_url="memory://", data_dir=data_dir,
        tls=_self_signed(data_dir),
        acme=AcmeConfig(names=(NAME,), directory=pebble.directory, ca_bundle=pebble.ca_bundle,
                        retry_first=1.0, order_timeout=20.0))
    AcmeServer.root_pem = pebble.root_pem
    return AcmeServer(config)


def _self_signed(data_dir: Path) -> TLSConfig:
    return ensure_self_signed(data_dir, [NAME])


class _ByName(HTTPAdapter):
    """Connect by address, but send NAME as SNI and check the certificate against it."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = NAME
        super().init_poolmanager(*args, **kwargs)


def served_certificate(port: int, root_pem: str | None = None) -> bytes:
    """The DER certificate the relay presents to a handshake for NAME (verified against
    pebble's root when given)."""
    if root_pem:
        context = ssl.create_default_context(cadata=root_pem)
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=NAME) as tls:
        der = tls.getpeercert(binary_form=True)
        assert tls.selected_alpn_protocol() is None
        assert der is not None
        return der


def wait_issued(server: AcmeServer, orders: int = 1, timeout: float = 30.0) -> None:
    manager = server.server.certificates
    assert manager is not None
    deadline = time.monotonic() + timeout
    while manager.orders < orders or not _installed(server):
        if time.monotonic() > deadline:
            raise AssertionError(f"no certificate: {manager.last_error}")
        time.sleep(0.1)


def _installed(server: AcmeServer) -> bool:
    try:
        served_certificate(server.port, AcmeServer.root_pem)
    except ssl.SSLCertVerificationError:
        return False
    return True


def test_tls_alpn_certificate_curl_requests_renewal_and_restart(pebble: Pebble,
                                                               tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root_pem)
    server = start_relay(pebble, data_dir)
    try:
        wait_issued(server)
        stored = data_dir / "acme"
        for name in ("key.pem", "account-key.pem", "account.json"):
            assert (stored / name).stat().st_mode & 0o777 == 0o600, name
        first = served_certificate(server.port, pebble.root_pem)

        # A normal handshake offering http/1.1 and acme-tls/1 gets the real certificate and
        # negotiates no acme-tls/1 (no challenge is pending).
        context = ssl.create_default_context(cadata=pebble.root_pem)
        context.set_alpn_protocols(["http/1.1", ALPN_ACME])
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=NAME) as tls:
            assert tls.selected_alpn_protocol() is None

        entry = server.add_entry()
        url = f"https://{NAME}:{server.port}/hello"
        with HiddenHTTPService(server, entry, parked=2) as service:
            # curl and requests trust only pebble's root, and check the name.
            out = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", str(root), "--resolve",
                 f"{NAME}:{server.port}:127.0.0.1", "--digest", "-u", f"{entry.uuid}:x", url],
                capture_output=True, timeout=20, check=True)
            assert json.loads(out.stdout)["path"] == "/hello"

            # A pairing relaying across a renewal keeps going.
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            paired = context.wrap_socket(raw, server_hostname=NAME)
            basic = base64.b64encode(f"{entry.uuid}:x".encode()).decode()
            request = (f"GET /kept HTTP/1.1\r\nHost: {NAME}\r\n"
                       f"Authorization: Basic {basic}\r\n\r\n").encode()
            paired.sendall(request)
            assert b"/kept" in recv_until(paired, b"}")
            server.sync(server.server.certificates.renew_now)  # type: ignore[union-attr]
            wait_issued(server, orders=2)
            second = served_certificate(server.port, pebble.root_pem)
            assert second != first
            paired.sendall(request.replace(b"/kept", b"/still"))
            assert b"/still" in recv_until(paired, b"}")
            paired.close()

            # requests, by address with the name for SNI and the certificate check.
            session = requests.Session()
            session.mount("https://", _ByName())
            answer = session.get(f"https://127.0.0.1:{server.port}/r", verify=str(root),
                                 auth=HTTPDigestAuth(entry.uuid, "x"), timeout=10)
            assert answer.status_code == 200 and answer.json()["path"] == "/r"
        assert service.errors == []
    finally:
        server.stop()

    # A restart serves the stored certificate and orders nothing.
    again = start_relay(pebble, data_dir)
    try:
        assert served_certificate(again.port, pebble.root_pem) == second
        time.sleep(0.5)
        assert again.server.certificates is not None
        assert again.server.certificates.orders == 0
        assert pebble.orders() == 2  # the first order and the forced renewal
    finally:
        again.stop()


def test_unreachable_directory_keeps_self_signed_and_says_what_to_fix(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    config = ServerConfig(
        host="127.0.0.1", port=0, registry_url="memory://", data_dir=data_dir,
        tls=_self_signed(data_dir),
        acme=AcmeConfig(names=(NAME,), directory=f"https://127.0.0.1:{port}/dir",
                        retry_first=30.0))
    server = ServerThread(config)
    try:
        manager = server.server.certificates
        assert manager is not None
        deadline = time.monotonic() + 15
        while manager.last_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert manager.last_error is not None
        assert "cannot reach the ACME directory" in manager.last_error
        # Still serving, with the self-signed certificate.
        assert served_certificate(server.port)
    finally:
        server.stop()


def bio_handshake(port: int, server_name: str, alpn: list[str],
                  split: int | None = None) -> tuple[str | None, x509.Certificate]:
    """A TLS handshake through memory BIOs over a plain socket, so its ClientHello can be sent
    in two TCP segments (``split`` bytes first, the rest 50 ms later); returns the ALPN
    protocol chosen and the certificate presented."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = True
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            out = outgoing.read()
            if first and split is not None:
                raw.sendall(out[:split])
                time.sleep(0.05)
                out = out[split:]
            first = False
            raw.sendall(out)
            data = raw.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            incoming.write(data)
        raw.sendall(outgoing.read())
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return tls.selected_alpn_protocol(), x509.load_der_x509_certificate(der)


def _is_challenge(cert: x509.Certificate, digest: bytes) -> bool:
    try:
        found = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        return False
    return found.critical and digest in found.value.value  # type: ignore[attr-defined]


def test_pending_challenge_is_only_for_acme_tls_handshakes(pebble: Pebble, tmp_path: Path) -> None:
    """While a TLS-ALPN-01 challenge is pending for NAME, curl (and any handshake not offering
    acme-tls/1, or for another name) gets the real certificate; only one offering acme-tls/1
    for NAME gets the challenge certificate, also with its ClientHello in two segments."""
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root_pem)
    server = start_relay(pebble, tmp_path / "data")
    try:
        wait_issued(server)
        real = served_certificate(server.port, pebble.root_pem)
        assert server.server.hub is not None
        challenges = server.server.hub.challenges
        assert isinstance(challenges, Challenges)
        digest = hashlib.sha256(b"held pending by the test").digest()
        server.sync(challenges.add, NAME, digest)

        curl = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(root),
             "--resolve", f"{NAME}:{server.port}:127.0.0.1", f"https://{NAME}:{server.port}/"],
            capture_output=True, timeout=20, text=True)
        assert curl.returncode == 0, curl.stderr  # pebble's certificate, verified, for NAME
        assert curl.stdout == "401"
        assert served_certificate(server.port, pebble.root_pem) == real
        for alpn in (["h2", "http/1.1"], []):
            chosen, cert = bio_handshake(server.port, NAME, alpn or ["http/1.1"])
            assert not _is_challenge(cert, digest) and cert.public_bytes(DER) == real

        for split in (None, 3, 60):  # the ClientHello whole, or its record header cut
            chosen, cert = bio_handshake(server.port, NAME, ["acme-tls/1"], split=split)
            assert chosen == ALPN_ACME and _is_challenge(cert, digest), split
        chosen, cert = bio_handshake(server.port, NAME.upper(), ["http/1.1", "acme-tls/1"])
        assert chosen == ALPN_ACME and _is_challenge(cert, digest)
        # acme-tls/1 for a name with no pending challenge: the normal context, no acme-tls/1.
        chosen, cert = bio_handshake(server.port, "other.test", ["acme-tls/1", "http/1.1"])
        assert chosen is None and not _is_challenge(cert, digest)

        server.sync(challenges.remove, NAME)
        chosen, cert = bio_handshake(server.port, NAME, ["acme-tls/1", "http/1.1"])
        assert chosen is None and cert.public_bytes(DER) == real
    finally:
        server.stop()
