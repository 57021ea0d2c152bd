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
from pebble_support import MAIN_NAME, Pebble, PebbleTrustingRelay, fingerprint, run_pebble
from requests.adapters import HTTPAdapter
from requests.auth import HTTPDigestAuth
from support import free_port

from rendezvous.config import (
    HTTP_01,
    AcmeConfig,
    AcmeHttpConfig,
    ServerConfig,
    TLSConfig,
    parse_networks,
)
from rendezvous.server.certificates import ACME_IDENTIFIER_OID, ALPN_ACME, Challenges
from rendezvous.tls import ensure_self_signed

NAME = MAIN_NAME
DER = Encoding.DER

pytestmark = pytest.mark.skipif(shutil.which("pebble") is None,
                                reason="Debian's pebble package is not installed")


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    yield from run_pebble(tmp_path)



class AcmeServer(PebbleTrustingRelay):
    """A relay whose clients (the hidden service's parked connections) trust pebble's root and
    reach it by its certified name."""


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
    pebble's root when given); no ALPN offered, so never the challenge certificate's."""
    return fingerprint(port, NAME, root_pem)


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


def bio_handshake(port: int, server_name: str, alpn: list[str], split: int | None = None,
                  prefix: bytes = b"") -> tuple[str | None, x509.Certificate]:
    """A TLS handshake through memory BIOs over a plain socket, so its ClientHello can be sent
    in two TCP segments (``split`` bytes first, the rest 50 ms later) and after ``prefix`` (a
    PROXY header) in the same one; returns the ALPN protocol chosen and the certificate
    presented."""
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
            if first:
                out = prefix + out
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


def _plain_request(port: int, head: bytes, timeout: float = 5.0) -> bytes:
    """Send ``head`` to the plain-HTTP listener and read its whole answer (it closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def _location(answer: bytes) -> str:
    for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"location":
            return value.strip().decode()
    raise AssertionError(f"no Location in {answer!r}")


def test_http01_certificate_redirects_to_https_and_is_no_open_redirect(
        pebble: Pebble, tmp_path: Path) -> None:
    """--acme-http: pebble validates HTTP-01 on the relay's plain-HTTP listener (nothing
    answers TLS-ALPN-01: the relay's TLS port is not pebble's), curl http:// is sent to https://
    with 308, hostile Hosts go to the relay's own name, unknown tokens get 404, limits hold."""
    data_dir = tmp_path / "data"
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root_pem)
    config = ServerConfig(
        host="127.0.0.1", port=0, registry_url="memory://", data_dir=data_dir,
        tls=_self_signed(data_dir), domain=NAME,
        acme=AcmeConfig(names=(NAME,), directory=pebble.directory, ca_bundle=pebble.ca_bundle,
                        retry_first=1.0, order_timeout=20.0, challenge=HTTP_01),
        acme_http=AcmeHttpConfig(port=pebble.http_port, host="127.0.0.1", hosts=(NAME,),
                                 timeout=0.5, max_head_size=2048, max_connections=6))
    AcmeServer.root_pem = pebble.root_pem
    server = AcmeServer(config)
    http_port = pebble.http_port
    try:
        wait_issued(server)
        listener = server.server.plain_http
        assert listener is not None and listener.answered >= 1  # validated by HTTP-01

        def curl(*args: str) -> str:
            out = subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                 "--cacert", str(root), "--resolve", f"{NAME}:{http_port}:127.0.0.1",
                 "--resolve", f"{NAME}:{server.port}:127.0.0.1",
                 "--resolve", f"hub.{NAME}:{http_port}:127.0.0.1", *args],
                capture_output=True, timeout=20, text=True, check=True)
            return out.stdout

        https = f"https://{NAME}:{server.port}"
        assert curl(f"http://{NAME}:{http_port}/a/b?c=d") == f"308 {https}/a/b?c=d"
        # Followed: curl lands on the relay's TLS port, with pebble's certificate, verified.
        assert curl("-L", f"http://{NAME}:{http_port}/") == "401 "
        assert curl(f"http://hub.{NAME}:{http_port}/x") == (
            f"308 https://hub.{NAME}:{server.port}/x")
        assert curl("-X", "POST", "-d", "x=1", f"http://{NAME}:{http_port}/form").startswith(
            "308 ")
        for hostile in ("evil.example", f"{NAME}.evil.example", f"a.b.{NAME}",
                        f"evil.example/{NAME}", f"{NAME}@evil.example", "127.0.0.1", ""):
            answer = _plain_request(http_port, b"GET /p HTTP/1.1\r\nHost: %s\r\n\r\n"
                                    % hostile.encode())
            assert answer.startswith(b"HTTP/1.1 308 "), (hostile, answer)
            assert _location(answer) == f"{https}/p", hostile
        answer = _plain_request(http_port, b"GET //evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _location(answer) == f"{https}//evil.example/"  # a path on our host, still
        # An unknown token: 404, not a redirect.
        answer = _plain_request(
            http_port, b"GET /.well-known/acme-challenge/nope HTTP/1.1\r\nHost: %s\r\n\r\n"
            % NAME.encode())
        assert answer.startswith(b"HTTP/1.1 404 ")
        # Limits: a head too large, a head too slow, too many connections at once.
        answer = _plain_request(http_port, b"GET / HTTP/1.1\r\nX: " + b"a" * 4096 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert _plain_request(http_port, b"GET / HTTP/1.1\r\n").startswith(b"HTTP/1.1 408 ")
        idle = [socket.create_connection(("127.0.0.1", http_port), timeout=5) for _ in range(6)]
        try:
            time.sleep(0.1)
            assert _plain_request(http_port, b"").startswith(b"HTTP/1.1 503 ")
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.6)  # (the idle ones' deadline)
        answer = _plain_request(http_port, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % NAME.encode())
        assert answer.startswith(b"HTTP/1.1 308 ")  # and everything else keeps working
    finally:
        server.stop()


def test_pending_challenge_behind_a_proxy_header(tmp_path: Path) -> None:
    """From a trusted balancer the ClientHello comes behind a PROXY header (often in the same
    segment): it is read from what follows the header, and the CA's handshake still gets the
    challenge certificate, a visitor's the normal one."""
    data_dir = tmp_path / "data"
    config = ServerConfig(host="127.0.0.1", port=0, registry_url="memory://", data_dir=data_dir,
                          tls=_self_signed(data_dir),
                          proxy_protocol_from=parse_networks("127.0.0.0/8"))
    server = ServerThread(config)
    try:
        assert server.server.hub is not None
        challenges = Challenges()
        digest = hashlib.sha256(b"behind a balancer").digest()
        challenges.add(NAME, digest)
        server.server.hub.challenges = challenges
        header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n"
        chosen, cert = bio_handshake(server.port, NAME, ["acme-tls/1"], prefix=header)
        assert chosen == ALPN_ACME and _is_challenge(cert, digest)
        chosen, cert = bio_handshake(server.port, NAME, ["acme-tls/1"], prefix=header, split=20)
        assert chosen == ALPN_ACME and _is_challenge(cert, digest)
        chosen, cert = bio_handshake(server.port, NAME, ["h2", "http/1.1"], prefix=header)
        assert chosen is None and not _is_challenge(cert, digest)
    finally:
        server.stop()
