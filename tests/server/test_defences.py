"""Limits against guessing and hogging: failed-CONNECT buckets, per-address caps, stale parks."""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import pytest
from harness import ServerThread, recv_all, running_server

from rendezvous.config import GuessLimits
from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry
from rendezvous.server.ratelimit import GuessLimiter, TokenBuckets


def connect_answer(server: ServerThread, entry: Entry, token: str, source: str | None = None
                   ) -> bytes:
    with server.connect(source=source) as sock:
        sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        return recv_all(sock)


def wrong(entry: Entry) -> str:
    good = current_token(entry.base32, entry.step, entry.digits)
    return f"{(int(good) + 500_000) % 10**6:06d}"


def test_token_bucket_refills_one_per_interval() -> None:
    buckets = TokenBuckets(burst=2, interval=10.0)
    for _ in range(2):
        assert buckets.retry_after("a", 0.0) == 0
        buckets.spend("a", 0.0)
    assert buckets.retry_after("a", 0.0) == 10.0
    assert buckets.retry_after("a", 4.0) == 6.0
    assert buckets.retry_after("a", 10.0) == 0
    assert buckets.retry_after("b", 0.0) == 0  # other keys are untouched
    assert len(TokenBuckets(1, 1.0)) == 0


def test_full_buckets_are_forgotten() -> None:
    buckets = TokenBuckets(burst=1, interval=1.0)
    buckets.spend("a", 0.0)
    assert len(buckets) == 1
    buckets.retry_after("a", 5.0)
    assert len(buckets) == 0


def test_limiter_trusts_an_address_that_parked() -> None:
    limiter = GuessLimiter(GuessLimits(per_address_burst=100, per_id_burst=1))
    limiter.succeeded("10.0.0.1", "id", 0.0)
    limiter.failed("10.9.9.9", "id", 0.0)
    assert limiter.retry_after("10.9.9.9", "id", 0.0) > 0  # the ID's bucket is empty ...
    assert limiter.retry_after("10.0.0.1", "id", 0.0) == 0  # ... but not for its own address


def test_failed_connects_from_one_address_get_429_with_retry_after(tmp_path: Path) -> None:
    limits = GuessLimits(per_address_burst=3, per_address_interval=30.0, per_id_burst=100)
    with running_server(tmp_path, guesses=limits) as server:
        entry = server.add_entry()
        for _ in range(3):
            assert connect_answer(server, entry, wrong(entry)).startswith(b"HTTP/1.1 401\r\n")
        answer = connect_answer(server, entry, wrong(entry))
        assert re.match(rb"^HTTP/1\.1 429\r\nRetry-After: (\d+)\r\n\r\n", answer), answer
        assert answer.endswith(b'{"error":{"permanent":false,"diagnostic":"too many attempts"}}')
        retry_after = int(re.search(rb"Retry-After: (\d+)", answer).group(1))  # type: ignore[union-attr]
        assert 1 <= retry_after <= 30
        # Even the right token is not checked from that address now: no oracle for guessers.
        good = current_token(entry.base32, entry.step, entry.digits)
        assert connect_answer(server, entry, good).startswith(b"HTTP/1.1 429\r\n")
        # Another address is not affected.
        assert connect_answer(server, entry, wrong(entry), source="127.0.0.2").startswith(
            b"HTTP/1.1 401\r\n")


def test_attack_on_an_id_does_not_lock_out_its_hidden_server(tmp_path: Path) -> None:
    limits = GuessLimits(per_address_burst=100, per_id_burst=3, per_id_interval=60.0)
    with running_server(tmp_path, guesses=limits) as server:
        entry = server.add_entry()
        server.park(entry).close()  # the real hidden server parks from 127.0.0.1
        for _ in range(3):
            connect_answer(server, entry, wrong(entry), source="127.0.0.2")
        assert connect_answer(server, entry, wrong(entry), source="127.0.0.3").startswith(
            b"HTTP/1.1 429\r\n")  # the ID is locked for new addresses ...
        server.park(entry).close()  # ... but not for the address that parked before


def test_connections_per_address_are_capped(tmp_path: Path) -> None:
    with running_server(tmp_path, max_per_address=2) as server:
        entry = server.add_entry()
        parked = [server.park(entry) for _ in range(2)]
        # Over the cap a socket is closed at accept, before any TLS work: the handshake fails.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            server.connect().close()
        with server.connect(source="127.0.0.2") as other:  # another address still gets in
            other.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert recv_all(other).startswith(b"HTTP/1.1 401 ")
        assert server.parked(entry.uuid) == 2
        for sock in parked:
            sock.close()


def test_stale_parked_connections_are_closed(tmp_path: Path) -> None:
    with running_server(tmp_path, parked_timeout=0.3) as server:
        entry = server.add_entry()
        sock = server.park(entry)
        started = time.monotonic()
        assert recv_all(sock) == b""
        assert 0.25 <= time.monotonic() - started < 3
        sock.close()
        server.wait_parked(entry.uuid, 0)
