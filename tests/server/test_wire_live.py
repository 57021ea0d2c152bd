"""The wire kit's changes, against a real relay over TLS: a Digest response counts only for the
request target it was computed for (RFC 7616 §3.4.6), and a bare-LF head is answered 400 at once
instead of waiting for the head timeout."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from harness import ServerThread, recv_all, recv_until, running_server

from rendezvous.protocol import digest
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.registry import Entry, new_secret

PASSWORD = "open sesame"
HEAD_TIMEOUT = 8.0  # long, so an answer well before it cannot be the 408


@pytest.fixture
def server(tmp_path: Path) -> ServerThread:
    with running_server(tmp_path, pair_wait=0.3, settle=0.0,
                        head_timeout=HEAD_TIMEOUT) as thread:
        yield thread  # type: ignore[misc]


def protected_entry(server: ServerThread, uuid: str) -> Entry:
    entry = Entry(uuid=uuid, base32=new_secret(),
                  visitor=VisitorSecret.from_password(uuid, PASSWORD))
    server.call(server.registry.add(entry))
    return entry


def visitor_challenge(server: ServerThread, uuid: str) -> str:
    """The SHA-256 WWW-Authenticate line the relay sends a visitor without the password."""
    with server.connect() as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: r\r\nAuthorization: Basic "
                     f"{digest.basic_authorization(uuid, 'wrong').partition(' ')[2]}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        answer = recv_all(sock).decode("latin-1")
    assert answer.startswith("HTTP/1.1 401 "), answer
    match = re.search(r"WWW-Authenticate: (Digest [^\r]*algorithm=SHA-256[^\r]*)", answer)
    assert match is not None, answer
    return match.group(1)


def test_a_digest_computed_for_another_uri_is_refused_like_a_wrong_password(
        server: ServerThread) -> None:
    entry = protected_entry(server, "uri-check")
    hidden = server.park(entry)
    server.wait_parked(entry.uuid, 1)
    for_other = digest.digest_authorization(
        visitor_challenge(server, entry.uuid), entry.uuid, PASSWORD, "GET", "/other")
    with server.connect() as mobile:
        mobile.sendall(f"GET / HTTP/1.1\r\nHost: r\r\nAuthorization: {for_other}\r\n\r\n"
                       .encode())
        head = recv_until(mobile, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), head
        assert b"WWW-Authenticate: Digest" in head
    assert server.parked(entry.uuid) == 1  # the hidden server never saw it

    # The same password, for the target actually requested, is paired.
    right = digest.digest_authorization(
        visitor_challenge(server, entry.uuid), entry.uuid, PASSWORD, "GET", "/mine")
    with server.connect() as mobile:
        mobile.sendall(f"GET /mine HTTP/1.1\r\nHost: r\r\nAuthorization: {right}\r\n\r\n"
                       .encode())
        assert recv_until(hidden, b"\r\n\r\n") == b"GET /mine HTTP/1.1\r\nHost: r\r\n\r\n"
    hidden.close()


@pytest.mark.parametrize("head", [b"GET / HTTP/1.1\nHost: r\n\n",
                                  b"GET / HTTP/1.1\r\nHost: r\r\n\n"])
def test_a_bare_lf_head_gets_400_at_once(server: ServerThread, head: bytes) -> None:
    with server.connect(timeout=HEAD_TIMEOUT + 2) as sock:
        started = time.monotonic()
        sock.sendall(head)
        answer = recv_all(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"bare LF" in answer
    assert elapsed < HEAD_TIMEOUT / 2, elapsed
    entry = server.add_entry()  # and the relay keeps serving
    server.park(entry).close()


def test_a_bare_lf_request_later_on_a_pairing_gets_400_after_the_first_answer(
        server: ServerThread) -> None:
    entry = server.add_entry()
    hidden = server.park(entry)
    server.wait_parked(entry.uuid, 1)
    with server.connect(timeout=HEAD_TIMEOUT + 2) as mobile:
        name = digest.basic_authorization(entry.uuid, "x")
        mobile.sendall(f"GET /1 HTTP/1.1\r\nHost: r\r\nAuthorization: {name}\r\n\r\n".encode())
        assert recv_until(hidden, b"\r\n\r\n") == b"GET /1 HTTP/1.1\r\nHost: r\r\n\r\n"
        mobile.sendall(b"GET /2 HTTP/1.1\nHost: r\n\n")
        started = time.monotonic()
        hidden.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        answer = recv_all(mobile)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), answer
    assert answer[len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"):].startswith(
        b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert elapsed < HEAD_TIMEOUT / 2, elapsed
    hidden.close()
