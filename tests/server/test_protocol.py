"""Each case of docs/protocol.md, driven over raw TLS sockets and checked byte for byte."""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import time
from pathlib import Path

import pytest
from harness import PARKED, ServerThread, recv_all, recv_exactly, recv_until, running_server

from rendezvous.protocol.totp import current_token


def error_json(diagnostic: str, permanent: bool = False) -> bytes:
    return json.dumps({"error": {"permanent": permanent, "diagnostic": diagnostic}},
                      separators=(",", ":")).encode()


def basic(uuid: str) -> str:
    return "Basic " + base64.b64encode(f"{uuid}:x".encode()).decode()


def exchange(server: ServerThread, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes."""
    with server.connect() as sock:
        sock.sendall(data)
        return recv_all(sock)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One framed HTTP response: (head, body)."""
    head = recv_until(sock, b"\r\n\r\n")
    head, _, body = head.partition(b"\r\n\r\n")
    match = re.search(rb"Content-Length: (\d+)", head)
    length = int(match.group(1)) if match else 0
    if len(body) < length:
        body += recv_exactly(sock, length - len(body))
    return head + b"\r\n\r\n", body


@pytest.fixture
def server(tmp_path: Path) -> ServerThread:
    with running_server(tmp_path, pair_wait=0.2, settle=0.0) as thread:
        yield thread  # type: ignore[misc]


# 1. Parking -------------------------------------------------------------------------------


def test_connect_with_wrong_scheme_gets_403(server: ServerThread) -> None:
    answer = exchange(server, b"CONNECT host:443 HTTP/1.1\r\n\r\n")
    assert answer == b"HTTP/1.1 403\r\n\r\n" + error_json("invalid protocol, should be uuid:")


def test_connect_without_response_gets_407(server: ServerThread) -> None:
    entry = server.add_entry()
    answer = exchange(server, f"CONNECT uuid:{entry.uuid} HTTP/1.1\r\n\r\n".encode())
    assert answer == b"HTTP/1.1 407\r\n\r\n" + error_json("missing response parameter")


def test_data_sent_with_the_connect_head_gets_409(server: ServerThread) -> None:
    entry = server.add_entry()
    token = current_token(entry.base32, entry.step, entry.digits)
    answer = exchange(
        server, f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\nEARLY".encode())
    assert answer == b"HTTP/1.1 409\r\n\r\n" + error_json(
        "wait for response to CONNECT before sending data")
    assert server.parked(entry.uuid) == 0


@pytest.mark.parametrize("case", ["unknown id", "wrong token", "short token", "letters"])
def test_bad_credentials_get_401(server: ServerThread, case: str) -> None:
    entry = server.add_entry()
    good = current_token(entry.base32, entry.step, entry.digits)
    uuid, token = {
        "unknown id": ("no-such-id", good),
        "wrong token": (entry.uuid, f"{(int(good) + 1) % 10**6:06d}"),
        "short token": (entry.uuid, good[:5]),
        "letters": (entry.uuid, "abcdef"),
    }[case]
    started = time.monotonic()
    answer = exchange(server, f"CONNECT uuid:{uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
    assert answer == b"HTTP/1.1 401\r\n\r\n" + error_json("invalid request")
    assert time.monotonic() - started < 2  # the original never answered a short token


def test_good_token_parks_with_exact_200(server: ServerThread) -> None:
    entry = server.add_entry()
    sock = server.connect()
    token = current_token(entry.base32, entry.step, entry.digits)
    sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n"
                 "Host: relay\r\nUser-Agent: hub\r\n\r\n".encode())
    assert recv_exactly(sock, len(PARKED)) == b"HTTP/1.1 200\r\n\r\n"
    server.wait_parked(entry.uuid, 1)
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(1)  # nothing more until a mobile client comes
    sock.close()


@pytest.mark.parametrize(("offset", "accepted"), [(-30, True), (30, True), (-90, False),
                                                  (90, False)])
def test_clock_skew_of_one_step_is_accepted(server: ServerThread, offset: int,
                                            accepted: bool) -> None:
    entry = server.add_entry()
    token = current_token(entry.base32, entry.step, entry.digits, time.time() + offset)
    answer = exchange(server, f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n"
                      .encode()) if not accepted else None
    if accepted:
        server.park(entry, token).close()
    else:
        assert answer is not None and answer.startswith(b"HTTP/1.1 401\r\n\r\n")


@pytest.mark.parametrize("digits", [7, 8])
def test_longer_tokens_park(server: ServerThread, digits: int) -> None:
    entry = server.add_entry(digits=digits)
    server.park(entry).close()


def test_one_code_parks_a_whole_pool(server: ServerThread) -> None:
    entry = server.add_entry()
    token = current_token(entry.base32, entry.step, entry.digits)
    socks = [server.park(entry, token) for _ in range(4)]
    server.wait_parked(entry.uuid, 4)
    for sock in socks:
        sock.close()
    server.wait_parked(entry.uuid, 0)  # a parked connection that closes leaves at once


def test_parked_connection_ended_with_close_notify_leaves_the_pool(
        server: ServerThread) -> None:
    entry = server.add_entry()
    sock = server.park(entry)
    server.wait_parked(entry.uuid, 1)
    sock.unwrap()  # type: ignore[attr-defined]  # a TLS close_notify, not just a TCP close
    server.wait_parked(entry.uuid, 0)
    sock.close()


def test_full_pool_closes_its_oldest(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=2, settle=0.0) as server:
        entry = server.add_entry()
        first, second, third = (server.park(entry) for _ in range(3))
        assert recv_all(first) == b""  # evicted
        server.wait_parked(entry.uuid, 2)
        first.close()
        second.close()
        third.close()


def test_pool_is_lifo(server: ServerThread) -> None:
    entry = server.add_entry()
    hidden = [server.park(entry) for _ in range(3)]
    server.wait_parked(entry.uuid, 3)
    for number, parked in enumerate(reversed(hidden)):  # the newest is paired first
        with server.connect() as mobile:
            mobile.sendall(f"GET /{number} HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n\r\n"
                           .encode())
            assert recv_until(parked, b"\r\n\r\n").startswith(f"GET /{number} ".encode())
        parked.close()


# 2. Mobile clients ------------------------------------------------------------------------

CHALLENGE = re.compile(
    rb'^HTTP/1\.1 401 Unauthorized\r\n'
    rb'WWW-Authenticate: Digest realm="rendezvous", qop="auth, auth-int", '
    rb'nonce="[0-9a-f]{32}", opaque="a4f316df3e6c55a20ca82389083849ea"\r\n'
    rb'Content-Length: 0\r\n\r\n$')


def test_request_without_credentials_gets_digest_challenge_and_keeps_alive(
        server: ServerThread) -> None:
    entry = server.add_entry()
    hidden = server.park(entry)
    with server.connect() as mobile:
        mobile.sendall(b"GET /a HTTP/1.1\r\nHost: relay\r\n\r\n")
        head, body = read_response(mobile)
        assert CHALLENGE.match(head) and body == b""
        # The retry on the same connection is paired (curl and requests do exactly this).
        mobile.sendall(f"GET /a HTTP/1.1\r\nHost: relay\r\nAuthorization: Digest username="
                       f'"{entry.uuid}", realm="rendezvous", nonce="00", uri="/a", '
                       'response="00"\r\nAccept: */*\r\n\r\n'.encode())
        assert recv_until(hidden, b"\r\n\r\n") == (
            b"GET /a HTTP/1.1\r\nHost: relay\r\nAccept: */*\r\n\r\n")
    hidden.close()


def test_nonces_are_fresh(server: ServerThread) -> None:
    nonces = set()
    for _ in range(3):
        answer = exchange(server, b"GET / HTTP/1.0\r\n\r\n")
        nonces.add(re.search(rb'nonce="(\w+)"', answer).group(1))  # type: ignore[union-attr]
    assert len(nonces) == 3


def test_http10_challenge_closes(server: ServerThread) -> None:
    answer = exchange(server, b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nConnection: close\r\n" in answer


def test_upgrade_without_id_gets_terse_401_and_close(server: ServerThread) -> None:
    answer = exchange(server, b"GET /ws HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\n\r\n")
    assert re.match(rb'^HTTP/1\.1 401\r\nWWW-Authenticate: Digest realm="rendezvous", '
                    rb'qop="auth, auth-int", nonce="[0-9a-f]{32}", '
                    rb'opaque="a4f316df3e6c55a20ca82389083849ea"\r\n\r\n$', answer)


@pytest.mark.parametrize("authorization", ["Bearer abc", "Basic !!!notbase64", "Digest realm=x",
                                           "Basic " + base64.b64encode(b"nocolon").decode()])
def test_malformed_authorization_gets_400_and_keeps_alive(server: ServerThread,
                                                         authorization: str) -> None:
    with server.connect() as mobile:
        for _ in range(2):  # the connection survives the error
            mobile.sendall(f"GET / HTTP/1.1\r\nAuthorization: {authorization}\r\n\r\n".encode())
            head, body = read_response(mobile)
            assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert body == error_json("invalid Authorization header", permanent=True)


def test_malformed_authorization_on_upgrade_is_terse(server: ServerThread) -> None:
    answer = exchange(server, b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n"
                              b"Authorization: Bearer x\r\n\r\n")
    assert answer == b"HTTP/1.1 400\r\n\r\n" + error_json("invalid Authorization header", True)


def test_unknown_id_gets_404_after_pair_wait_and_keeps_alive(server: ServerThread) -> None:
    with server.connect() as mobile:
        started = time.monotonic()
        mobile.sendall(f"POST / HTTP/1.1\r\nAuthorization: {basic('nobody')}\r\n"
                       "Content-Length: 4\r\n\r\nbody".encode())
        head, body = read_response(mobile)
        assert time.monotonic() - started >= 0.2  # --pair-wait
        assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert body == error_json("UUID not registered")
        # The refused request's body was skipped: the next head is read correctly.
        mobile.sendall(b"GET / HTTP/1.1\r\n\r\n")
        head, _ = read_response(mobile)
        assert CHALLENGE.match(head)


def test_unknown_id_on_upgrade_is_terse_404(server: ServerThread) -> None:
    answer = exchange(server, b"GET /?rendezvous=nobody HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
    assert answer == b"HTTP/1.1 404\r\n\r\n" + error_json("UUID not registered")


def test_mobile_waits_for_a_hidden_server_that_parks_within_pair_wait(tmp_path: Path) -> None:
    with running_server(tmp_path, pair_wait=3.0, settle=0.0) as server:
        entry = server.add_entry()
        with server.connect() as mobile:
            mobile.sendall(f"GET /late HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n\r\n"
                           .encode())
            time.sleep(0.3)
            hidden = server.park(entry)
            assert recv_until(hidden, b"\r\n\r\n").startswith(b"GET /late HTTP/1.1\r\n")
            hidden.close()


def test_rendezvous_query_routes_an_upgrade(server: ServerThread) -> None:
    entry = server.add_entry()
    hidden = server.park(entry)
    with server.connect() as mobile:
        request = (f"GET /ws?rendezvous={entry.uuid} HTTP/1.1\r\nHost: r\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n").encode()
        mobile.sendall(request)
        assert recv_until(hidden, b"\r\n\r\n") == request
    hidden.close()


def test_rendezvous_query_without_upgrade_is_challenged(server: ServerThread) -> None:
    entry = server.add_entry()
    answer = exchange(server, f"GET /?rendezvous={entry.uuid} HTTP/1.0\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")


def test_pairing_forwards_head_without_authorization_and_the_bytes_after_it(
        server: ServerThread) -> None:
    entry = server.add_entry()
    hidden = server.park(entry)
    with server.connect() as mobile:
        mobile.sendall(f"POST /up HTTP/1.1\r\nHost: r\r\nauthorization: {basic(entry.uuid)}\r\n"
                       "X-Order: 1\r\nContent-Length: 11\r\n\r\nhello world".encode())
        expected = (b"POST /up HTTP/1.1\r\nHost: r\r\nX-Order: 1\r\nContent-Length: 11\r\n\r\n"
                    b"hello world")
        assert recv_exactly(hidden, len(expected)) == expected
        hidden.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert recv_exactly(mobile, 27) == b"HTTP/1.1 204 No Content\r\n\r\n"
        # A later request naming the same ID goes to the same server, Authorization stripped.
        mobile.sendall(f"GET /2 HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n\r\n"
                       .encode())
        assert recv_until(hidden, b"\r\n\r\n") == b"GET /2 HTTP/1.1\r\n\r\n"
        hidden.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert recv_exactly(mobile, 27) == b"HTTP/1.1 204 No Content\r\n\r\n"
        # One naming no ID gets the relay's challenge, and the pairing goes on: the retry
        # with credentials for this ID reaches the same server.
        mobile.sendall(b"GET /unnamed HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
        head, _ = read_response(mobile)
        assert head.startswith(b"HTTP/1.1 401 ") and b"WWW-Authenticate: Digest" in head
        mobile.sendall(f"GET /named HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n\r\n"
                       .encode())
        assert recv_until(hidden, b"\r\n\r\n") == b"GET /named HTTP/1.1\r\n\r\n"
        hidden.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert recv_exactly(mobile, 27) == b"HTTP/1.1 204 No Content\r\n\r\n"
        # One naming another ID never reaches it: answered as a first request (404 here).
        mobile.sendall(f"GET /3 HTTP/1.1\r\nAuthorization: {basic('someone-else')}\r\n\r\n"
                       .encode())
        head, _ = read_response(mobile)
        assert head.startswith(b"HTTP/1.1 404 ")
        assert recv_all(hidden) == b""  # closed, having seen nothing more
    hidden.close()


def test_parked_connection_serves_only_one_mobile_client(server: ServerThread) -> None:
    entry = server.add_entry()
    hidden = server.park(entry)
    request = f"GET / HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n\r\n".encode()
    with server.connect() as first, server.connect() as second:
        first.sendall(request)
        recv_until(hidden, b"\r\n\r\n")
        second.sendall(request)
        head, _ = read_response(second)  # the pool is empty again
        assert head.startswith(b"HTTP/1.1 404 ")
    hidden.close()


def test_fresh_parked_connection_settles_before_pairing(tmp_path: Path) -> None:
    with running_server(tmp_path, settle=0.3) as server:
        entry = server.add_entry()
        with server.connect() as mobile:
            hidden = server.park(entry)
            parked_at = time.monotonic()
            mobile.sendall(f"GET / HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n\r\n"
                           .encode())
            recv_until(hidden, b"\r\n\r\n")
            assert time.monotonic() - parked_at >= 0.25  # the 200 and the request came apart
            hidden.close()


# Limits and bad input ------------------------------------------------------------------


def test_malformed_head_gets_400_and_server_keeps_serving(server: ServerThread) -> None:
    answer = exchange(server, b"\x00\x01garbage\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in answer
    entry = server.add_entry()
    server.park(entry).close()


def test_oversized_head_gets_431(tmp_path: Path) -> None:
    with running_server(tmp_path, max_head_size=1024) as server:
        answer = exchange(server, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")


def test_too_many_headers_gets_431(tmp_path: Path) -> None:
    with running_server(tmp_path, max_headers=5) as server:
        headers = b"".join(b"X-%d: y\r\n" % n for n in range(6))
        answer = exchange(server, b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")


def test_slow_head_is_timed_out(tmp_path: Path) -> None:
    with running_server(tmp_path, head_timeout=0.3) as server:
        with server.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            started = time.monotonic()
            answer = recv_all(sock)
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 2
        with server.connect() as idle:  # an idle connection (browsers open several) just closes
            assert recv_all(idle) == b""


def test_silent_tls_handshake_is_timed_out(tmp_path: Path) -> None:
    with (running_server(tmp_path, head_timeout=0.3) as server,
          socket.create_connection(("127.0.0.1", server.port)) as raw):
        raw.settimeout(3)
        assert raw.recv(1) == b""


def test_connection_limit_refuses_only_the_excess(tmp_path: Path) -> None:
    with running_server(tmp_path, max_connections=3) as server:
        entry = server.add_entry()
        parked = [server.park(entry) for _ in range(3)]
        # Closed at accept, before any TLS work (plain TCP says 503: test_hostile.py).
        with pytest.raises((ssl.SSLError, ConnectionError)):
            server.connect().close()
        assert server.parked(entry.uuid) == 3  # nobody else noticed
        parked[0].close()
        server.wait_parked(entry.uuid, 2)
        server.park(entry).close()
        for sock in parked[1:]:
            sock.close()
