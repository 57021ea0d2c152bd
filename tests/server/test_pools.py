"""Pools against a real relay: LIFO pairing, the sweeper, and one leaked code (issue 11 item 6),
with peers told apart by their loopback source address."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

import pytest
from harness import PARKED, ServerThread, recv_all, recv_exactly, recv_until, running_server

from rendezvous.protocol.totp import current_token

REAL = "127.0.0.2"  # the hidden server
ATTACKER = "127.0.0.3"  # holds a leaked code
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"


def basic(uuid: str) -> str:
    return "Basic " + base64.b64encode(f"{uuid}:x".encode()).decode()


def connect_with(server: ServerThread, uuid: str, token: str, source: str) -> bytes:
    """A CONNECT from ``source``; the relay's whole answer when it refuses (closing), else the
    ``200`` (the socket is then closed by us)."""
    with server.connect(source=source) as sock:
        sock.sendall(f"CONNECT uuid:{uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        first = recv_exactly(sock, len(PARKED))
        if first == PARKED:
            return first
        return first + recv_all(sock)


def visit(server: ServerThread, uuid: str, parked: list[socket.socket]) -> socket.socket:
    """A visitor's request; which of ``parked`` the relay paired it with (that one answers)."""
    mobile = server.connect()
    mobile.sendall(f"GET /who HTTP/1.1\r\nAuthorization: {basic(uuid)}\r\n\r\n".encode())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for sock in parked:
            sock.settimeout(0.02)
            try:
                head = recv_until(sock, b"\r\n\r\n")
            except TimeoutError:
                continue
            assert head.startswith(b"GET /who HTTP/1.1\r\n"), head
            for other in parked:
                other.settimeout(5)
            sock.sendall(REPLY)
            assert recv_exactly(mobile, len(REPLY)) == REPLY
            mobile.close()
            return sock
    raise AssertionError("no parked connection got the visitor's request")


def test_a_leaked_code_from_another_address_takes_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=8, settle=0.0) as server:
        entry = server.add_entry()
        token = current_token(entry.base32, entry.step, entry.digits)
        real = [server.park(entry, token, source=REAL) for _ in range(8)]
        server.wait_parked(entry.uuid, 8)
        refused = [connect_with(server, entry.uuid, token, ATTACKER) for _ in range(8)]
        invalid = json.dumps({"error": {"permanent": False, "diagnostic": "invalid request"}},
                             separators=(",", ":")).encode()
        assert refused == [b"HTTP/1.1 401\r\n\r\n" + invalid] * 8
        assert server.parked(entry.uuid) == 8
        for sock in real:  # none of them was evicted: each is still open and silent
            sock.settimeout(0.05)
            with pytest.raises(TimeoutError):
                sock.recv(1)
        served = visit(server, entry.uuid, real)
        assert served is real[-1]  # LIFO: the real hidden server's newest
        for sock in real:
            sock.close()


def test_a_full_pool_refuses_another_address_instead_of_evicting(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=2, settle=0.0) as server:
        entry = server.add_entry()
        real = [server.park(entry, source=REAL) for _ in range(2)]
        server.wait_parked(entry.uuid, 2)
        # Another address with a code of its own (the previous step's: also valid).
        other = current_token(entry.base32, entry.step, entry.digits, time.time() - entry.step)
        answer = connect_with(server, entry.uuid, other, ATTACKER)
        assert answer.startswith(b"HTTP/1.1 503\r\n\r\n"), answer
        assert b"pool full of other addresses" in answer
        assert server.parked(entry.uuid) == 2
        # The same address still replaces its own oldest (a bound of 1 = the original).
        newest = server.park(entry, source=REAL)
        assert recv_all(real[0]) == b""
        server.wait_parked(entry.uuid, 2)
        assert visit(server, entry.uuid, [real[1], newest]) is newest
        for sock in (*real, newest):
            sock.close()


def test_sweeper_closes_the_oldest_even_after_newer_ones_paired(tmp_path: Path) -> None:
    with running_server(tmp_path, parked_timeout=0.6, settle=0.0) as server:
        entry = server.add_entry()
        old = server.park(entry)
        time.sleep(0.3)
        newer = [server.park(entry) for _ in range(2)]
        server.wait_parked(entry.uuid, 3)
        assert visit(server, entry.uuid, [old, *newer]) is newer[-1]
        started = time.monotonic()
        assert recv_all(old) == b""  # swept at ~0.6 s of age, the newer one still parked
        assert server.parked(entry.uuid) == 1
        assert recv_all(newer[0]) == b""
        assert time.monotonic() - started < 3
        server.wait_parked(entry.uuid, 0)
        for sock in (old, *newer):
            sock.close()


def test_visitor_is_served_by_the_live_connection_not_the_abandoned_one(
        tmp_path: Path) -> None:
    # Measured with FIFO pools: a hidden server parked a second connection while its first sat
    # open and unread; the next visitor was paired with the abandoned one and hung.
    with running_server(tmp_path, settle=0.0) as server:
        entry = server.add_entry()
        abandoned = server.park(entry, source=REAL)
        live = server.park(entry, source=REAL)
        server.wait_parked(entry.uuid, 2)
        with server.connect(timeout=2) as mobile:
            mobile.sendall(f"GET / HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n\r\n"
                           .encode())
            live.settimeout(2)
            assert recv_until(live, b"\r\n\r\n").startswith(b"GET / HTTP/1.1\r\n")
            live.sendall(REPLY)
            assert recv_exactly(mobile, len(REPLY)) == REPLY  # within the 2 s timeout
        assert server.parked(entry.uuid) == 1  # the abandoned one waits for its sweep
        abandoned.close()
        live.close()
