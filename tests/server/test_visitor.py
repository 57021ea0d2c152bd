"""The optional visitor check: an entry with a visitor password gets real Digest verification."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from harness import HiddenHTTPService, ServerThread, recv_all, recv_until, running_server
from requests.auth import HTTPDigestAuth

from rendezvous.protocol.digest import NonceBook, VisitorSecret, verify
from rendezvous.registry import Entry, new_secret

PASSWORD = "open sesame"


def protected_entry(server: ServerThread) -> Entry:
    uuid = f"guarded-{len(str(server.port))}-{id(server)}"
    entry = Entry(uuid=uuid, base32=new_secret(),
                  visitor=VisitorSecret.from_password(uuid, PASSWORD))
    server.call(server.registry.add(entry))
    return entry


def digest_authorization(uuid: str, password: str, nonce: str, uri: str, algorithm: str,
                         nc: str = "00000001", method: str = "GET") -> str:
    def h(text: str) -> str:
        function = hashlib.sha256 if algorithm == "SHA-256" else hashlib.md5
        return function(text.encode()).hexdigest()

    cnonce = "0a4f113b"
    ha1 = h(f"{uuid}:rendezvous:{password}")
    response = h(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{h(f'{method}:{uri}')}")
    return (f'Digest username="{uuid}", realm="rendezvous", nonce="{nonce}", uri="{uri}", '
            f'algorithm={algorithm}, qop=auth, nc={nc}, cnonce="{cnonce}", '
            f'response="{response}"')


def challenge_nonce(server: ServerThread) -> str:
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = recv_all(sock)
    return re.search(rb'nonce="([0-9a-f]{32})"', answer).group(1).decode()  # type: ignore[union-attr]


@pytest.fixture
def server(tmp_path: Path) -> ServerThread:
    with running_server(tmp_path, pair_wait=0.3, settle=0.0) as thread:
        yield thread  # type: ignore[misc]


# I/O-free -------------------------------------------------------------------------------


def test_nonces_expire_and_counts_cannot_be_replayed() -> None:
    book = NonceBook(b"k" * 32)
    nonce = book.issue(now=1000.0)
    # 32 lowercase hex digits (docs/protocol.md §2), the first 8 the issue time that expiry reads.
    assert re.fullmatch("[0-9a-f]{32}", nonce), nonce
    assert nonce[:8] == f"{1000:08x}"
    assert book.issue(now=1000.0) != nonce  # two clients challenged in one second differ
    assert book.check(nonce, "00000001", now=1001.0) == "ok"
    assert book.check(nonce, "00000001", now=1001.0) == "invalid"  # replay
    assert book.check(nonce, "00000002", now=1002.0) == "ok"
    assert book.check(nonce, "00000003", now=1000.0 + 301) == "stale"
    assert NonceBook(b"other key" * 4).check(nonce, "00000009", now=1001.0) == "invalid"
    assert book.check("0" * 32, "00000001", now=1001.0) == "invalid"


def test_verify_accepts_md5_sha256_and_basic_with_the_right_password() -> None:
    secret = VisitorSecret.from_password("id", "pw")
    book = NonceBook()
    for algorithm in ("MD5", "SHA-256"):
        header = digest_authorization("id", "pw", book.issue(), "/x", algorithm)
        assert verify(header.encode(), "GET", "id", secret, book, target="/x") == "ok"
        wrong = digest_authorization("id", "nope", book.issue(), "/x", algorithm)
        assert verify(wrong.encode(), "GET", "id", secret, book, target="/x") == "invalid"
    basic = "Basic " + base64.b64encode(b"id:pw").decode()
    assert verify(basic.encode(), "GET", "id", secret, book, target="/x") == "ok"
    bad = "Basic " + base64.b64encode(b"id:pW").decode()
    assert verify(bad.encode(), "GET", "id", secret, book, target="/x") == "invalid"
    other_method = digest_authorization("id", "pw", book.issue(), "/x", "MD5", method="GET")
    assert verify(other_method.encode(), "POST", "id", secret, book, target="/x") == "invalid"


# Through the relay ------------------------------------------------------------------------


def test_requests_with_the_right_password_is_paired(server: ServerThread) -> None:
    entry = protected_entry(server)
    verify_path = str(server.tls.cert_file)  # type: ignore[union-attr]
    with HiddenHTTPService(server, entry, parked=1) as service:
        answer = requests.get(server.url() + "/in", auth=HTTPDigestAuth(entry.uuid, PASSWORD),
                              verify=verify_path, timeout=10)
        assert answer.status_code == 200 and answer.json()["path"] == "/in"
        wrong = requests.get(server.url() + "/in", auth=HTTPDigestAuth(entry.uuid, "guess"),
                             verify=verify_path, timeout=10)
        assert wrong.status_code == 401
        assert 'algorithm=SHA-256' in wrong.headers["WWW-Authenticate"]
        assert service.pairings == 1  # the stranger never reached it
    server.wait_parked(entry.uuid, 0)  # the service closed its parked connection


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_digest_with_right_and_wrong_password(server: ServerThread) -> None:
    entry = protected_entry(server)
    cert = str(server.tls.cert_file)  # type: ignore[union-attr]
    with HiddenHTTPService(server, entry, parked=1):
        codes = {}
        for password in (PASSWORD, "wrong"):
            result = subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--digest", "-u",
                 f"{entry.uuid}:{password}", "--cacert", cert, server.url() + "/c"],
                capture_output=True, text=True, timeout=20, check=False)
            codes[password] = result.stdout
        assert codes == {PASSWORD: "200", "wrong": "401"}


def test_sha256_response_is_verified_and_replays_refused(server: ServerThread) -> None:
    entry = protected_entry(server)
    hidden = server.park(entry)
    server.wait_parked(entry.uuid, 1)
    nonce = challenge_nonce(server)
    header = digest_authorization(entry.uuid, PASSWORD, nonce, "/s", "SHA-256")
    request = f"GET /s HTTP/1.1\r\nHost: r\r\nAuthorization: {header}\r\n\r\n".encode()
    with server.connect() as mobile:
        mobile.sendall(request)
        assert recv_until(hidden, b"\r\n\r\n") == b"GET /s HTTP/1.1\r\nHost: r\r\n\r\n"
    hidden.close()
    second = server.park(entry)
    with server.connect() as replay:  # the same response again, on a new connection
        replay.sendall(request)
        head = recv_until(replay, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert server.parked(entry.uuid) == 1  # the parked connection was not spent on it
    second.close()


def test_upgrade_named_by_query_needs_credentials(server: ServerThread) -> None:
    entry = protected_entry(server)
    hidden = server.park(entry)
    with server.connect() as mobile:
        mobile.sendall(f"GET /ws?rendezvous={entry.uuid} HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
                       .encode())
        assert recv_all(mobile).startswith(b"HTTP/1.1 401\r\nWWW-Authenticate: Digest")
    server.wait_parked(entry.uuid, 1)
    hidden.close()


def test_entries_without_a_visitor_password_accept_any_password(server: ServerThread) -> None:
    entry = server.add_entry()
    with HiddenHTTPService(server, entry, parked=1):
        answer = requests.get(server.url() + "/", auth=HTTPDigestAuth(entry.uuid, "anything"),
                              verify=str(server.tls.cert_file), timeout=10)  # type: ignore[union-attr]
        assert answer.status_code == 200
