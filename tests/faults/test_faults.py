"""Fault injection against a real relay over TLS.

Each test breaks something on purpose — a leg reset mid-stream (SO_LINGER 0, so a TCP RST), a
stall, a half-close, a reader that never reads while its peer floods, a TLS handshake that fails
or never finishes, a registry that goes away — and then checks the relay is whole again: its
open connections, its event loop's tasks and this process's descriptors back at their baseline,
no exception on its loop, and a normal park + pair working.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from faults.relay_checks import (
    HEAD_END,
    LoopErrors,
    MiB,
    Snapshot,
    assert_pairing_works,
    client_hello,
    idle_snapshot,
    mobile_head,
    pair,
    raw_connect,
    read_to_close,
    reset,
    snapshot,
    vm_rss,
    wait_for_baseline,
)
from harness import (
    PARKED,
    ServerThread,
    recv_exactly,
    recv_until,
    run_in_thread,
    running_server,
)
from support import free_port, stop_process, tail, wait_for_port

from rendezvous.config import GuessLimits
from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry, Registry, open_registry
from rendezvous.registry.memory import MemoryRegistry
from rendezvous.server.connection import SSL_SHUTDOWN_TIMEOUT

pytestmark = pytest.mark.timeout(90)

HEAD_TIMEOUT = 0.5
# The relay must have closed a timed-out peer by head timeout + this (a busy machine's slack).
SLACK = 1.5


class Relay:
    """A running relay with its entry, loop-error capture and baseline."""

    def __init__(self, server: ServerThread, entry: Entry, errors: LoopErrors) -> None:
        self.server = server
        self.entry = entry
        self.errors = errors
        assert_pairing_works(server, entry)  # warm up: first-use allocations are not leaks
        self.baseline: Snapshot = idle_snapshot(server)

    def check_recovered(self, timeout: float = 5.0) -> None:
        """Back at baseline, nothing on the loop, and a normal pairing works."""
        wait_for_baseline(self.server, self.baseline, timeout)
        self.errors.assert_none()
        assert_pairing_works(self.server, self.entry)
        wait_for_baseline(self.server, self.baseline, timeout)
        self.errors.assert_none()


@contextlib.contextmanager
def relay(tmp_path: Path, registry: Registry | None = None, **limits: Any) -> Iterator[Relay]:
    limits.setdefault("head_timeout", HEAD_TIMEOUT)
    limits.setdefault("pair_wait", 0.5)
    with running_server(tmp_path, registry=registry, **limits) as server, \
            LoopErrors(server) as errors:
        yield Relay(server, server.add_entry(), errors)


def joined(thread: threading.Thread, outcome: list[Any], timeout: float) -> Any:
    """The thread's result (or raised exception object), after it ends within ``timeout``."""
    thread.join(timeout)
    assert not thread.is_alive(), f"thread still blocked after {timeout} s"
    (value,) = outcome
    return value


def assert_closed_within(sock: socket.socket, seconds: float) -> bytes:
    data, closed = read_to_close(sock, seconds)
    assert closed, f"not closed within {seconds} s (read {len(data)} bytes)"
    return data


class Flood:
    """Sends ``total`` bytes on ``sock`` from a thread, counting progress; ``stop()`` ends it
    between writes, so the socket can then be reset from this thread. The chunks differ (a
    counter in front of a shared random block), so order is checkable."""

    CHUNK = MiB
    WRITE = 256 * 1024

    def __init__(self, sock: ssl.SSLSocket, total: int, seed: int = 1) -> None:
        self.sock = sock
        self.total = total
        self.block = random.Random(seed).randbytes(self.CHUNK)
        self.sent = 0
        self._stop = threading.Event()
        sock.setblocking(False)
        self.thread, self.outcome = run_in_thread(self._run)

    def chunk(self, index: int) -> bytes:
        return index.to_bytes(8, "big") + self.block[8:]

    def stream(self, size: int) -> bytes:
        """The first ``size`` bytes of the flood."""
        chunks = (self.chunk(index) for index in range(-(-size // self.CHUNK)))
        return b"".join(chunks)[:size]

    def expected_sha256(self) -> str:
        digest = hashlib.sha256()
        for index in range(self.total // self.CHUNK):
            digest.update(self.chunk(index))
        return digest.hexdigest()

    def _run(self) -> int:
        for index in range(self.total // self.CHUNK):
            view = memoryview(self.chunk(index))
            offset = 0
            while offset < len(view):
                if self._stop.is_set():
                    return self.sent
                try:
                    # A retry after want-write sends the same bytes again, as OpenSSL needs.
                    written = self.sock.send(view[offset:offset + self.WRITE])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    select.select([], [self.sock], [], 0.05)
                    continue
                offset += written
                self.sent += written
        return self.sent

    def stop(self) -> None:
        self._stop.set()
        joined(self.thread, self.outcome, 2.0)

    def wait_ended(self, timeout: float = SSL_SHUTDOWN_TIMEOUT + 5.0) -> Any:
        """The flood's end once its peer is gone. The relay closes the writer's leg (TLS
        close_notify) and reads on, discarding, for up to its TLS shutdown timeout (5 s), then
        cuts it: the writer finishes or fails within that, and never hangs."""
        return joined(self.thread, self.outcome, timeout)

    def wait_blocked(self, still: float = 0.5, timeout: float = 10.0) -> int:
        """Wait until progress has not moved for ``still`` seconds; the bytes sent by then."""
        deadline = time.monotonic() + timeout
        last, since = self.sent, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if self.sent != last:
                last, since = self.sent, time.monotonic()
            elif time.monotonic() - since >= still:
                return last
        raise AssertionError(f"the writer never blocked: {self.sent} bytes sent")


def receive_all(sock: ssl.SSLSocket, size: int, timeout: float = 30.0) -> str:
    digest = hashlib.sha256()
    got = 0
    sock.settimeout(timeout)
    while got < size:
        data = sock.recv(256 * 1024)
        assert data, f"closed after {got} of {size} bytes"
        digest.update(data)
        got += len(data)
    assert got == size
    return digest.hexdigest()


# Resets mid-stream --------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["mobile", "hidden"])
@pytest.mark.parametrize("moment", ["idle", "peer-sending", "self-sending"])
def test_a_leg_reset_mid_stream_closes_the_other(tmp_path: Path, side: str, moment: str) -> None:
    with relay(tmp_path) as r:
        mobile, hidden, rest = pair(r.server, r.entry)
        victim, other = (mobile, hidden) if side == "mobile" else (hidden, mobile)
        try:
            # Some traffic both ways first: the pair is relaying.
            mobile.sendall(b"ping")
            assert rest + recv_exactly(hidden, 4 - len(rest)) == b"ping"
            hidden.sendall(b"pong")
            assert recv_exactly(mobile, 4) == b"pong"
            if moment == "idle":
                reset(victim)
                assert_closed_within(other, 2.0)
            elif moment == "peer-sending":
                flood = Flood(other, 64 * MiB)
                flood.wait_blocked(still=0.3)
                reset(victim)
                flood.wait_ended()
                assert_closed_within(other, 2.0)
            else:  # the victim has bytes in flight towards the other side when it resets
                payload = random.Random(7).randbytes(4 * MiB)
                victim.setblocking(False)
                sent = 0
                with contextlib.suppress(ssl.SSLWantWriteError, BlockingIOError):
                    while sent < len(payload):
                        sent += victim.send(payload[sent:sent + 256 * 1024])
                reset(victim)
                received = assert_closed_within(other, 5.0)
                assert payload.startswith(received), "the other side got bytes out of order"
        finally:
            mobile.close()
            hidden.close()
        r.check_recovered()


def test_a_hidden_leg_reset_while_parked_leaves_the_pool(tmp_path: Path) -> None:
    with relay(tmp_path) as r:
        parked = r.server.park(r.entry)
        r.server.wait_parked(r.entry.uuid, 1)
        reset(parked)
        r.server.wait_parked(r.entry.uuid, 0)
        r.check_recovered()


def test_a_mobile_leg_reset_while_waiting_for_a_park(tmp_path: Path) -> None:
    with relay(tmp_path, pair_wait=3.0) as r:
        mobile = r.server.connect()
        mobile.sendall(mobile_head(r.server, r.entry))
        hub = r.server.server.hub
        assert hub is not None
        deadline = time.monotonic() + 2
        while not r.server.sync(lambda: hub.waiting_count()):
            assert time.monotonic() < deadline, "the mobile client never waited"
            time.sleep(0.01)
        reset(mobile)
        r.check_recovered()
        # A later park is not handed to the client that left.
        hidden = r.server.park(r.entry)
        r.server.wait_parked(r.entry.uuid, 1)
        hidden.close()
        r.check_recovered()


@pytest.mark.parametrize("side", ["mobile", "hidden"])
def test_a_leg_reset_while_the_pair_settles(tmp_path: Path, side: str) -> None:
    """Between the pairing and the start of relaying (the settle delay) either leg may vanish:
    a lost client gives its parked connection back; a lost parked connection is replaced."""
    with relay(tmp_path, settle=0.4, pair_wait=2.0) as r:
        hidden = r.server.park(r.entry)
        mobile = r.server.connect()
        mobile.sendall(mobile_head(r.server, r.entry))
        time.sleep(0.1)  # paired, settling
        if side == "mobile":
            reset(mobile)
            r.server.wait_parked(r.entry.uuid, 1)  # back in the pool
            hidden.close()
        else:
            reset(hidden)
            spare = r.server.park(r.entry)  # the client waits for another parked connection
            try:
                received = recv_until(spare, HEAD_END)
                assert received.startswith(b"POST /check HTTP/1.1\r\n"), received
                spare.sendall(b"answer")
                assert recv_exactly(mobile, 6) == b"answer"
            finally:
                spare.close()
                mobile.close()
        r.check_recovered()


class SlowRegistry(MemoryRegistry):
    """A registry that takes ``delay`` seconds per lookup."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def get(self, uuid: str) -> Entry | None:
        await asyncio.sleep(self.delay)
        return await super().get(uuid)


def test_a_hidden_leg_reset_while_its_token_is_checked(tmp_path: Path) -> None:
    # (entry_cache=0: every CONNECT reads the slow registry, the known ID's too)
    with relay(tmp_path, registry=SlowRegistry(0.5), head_timeout=3.0, entry_cache=0) as r:
        sock = r.server.connect()
        token = current_token(r.entry.base32, r.entry.step, r.entry.digits)
        sock.sendall(f"CONNECT uuid:{r.entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        time.sleep(0.1)  # the lookup is under way
        assert snapshot(r.server).tasks == r.baseline.tasks + 1  # the verification task
        reset(sock)
        r.check_recovered()  # the task ends (and parks nothing) once the lookup returns
        assert r.server.parked() == 0


# Stalls -------------------------------------------------------------------------------------


def test_a_stall_mid_stream_outlasting_the_head_timeout_loses_nothing(tmp_path: Path) -> None:
    body = random.Random(3).randbytes(2 * MiB)
    with relay(tmp_path) as r:
        mobile, hidden, rest = pair(r.server, r.entry, extra=body[:MiB])
        try:
            time.sleep(HEAD_TIMEOUT * 3)  # both legs quiet: relaying legs have no head timer
            mobile.sendall(body[MiB:])
            hidden.settimeout(10)
            got = rest + recv_exactly(hidden, len(body) - len(rest))
            assert got == body
            time.sleep(HEAD_TIMEOUT * 3)
            hidden.sendall(b"late answer")
            assert recv_exactly(mobile, 11) == b"late answer"
        finally:
            mobile.close()
            hidden.close()
        r.check_recovered()


def test_a_parked_connection_outlives_the_head_timeout(tmp_path: Path) -> None:
    with relay(tmp_path) as r:
        parked = r.server.park(r.entry)
        time.sleep(HEAD_TIMEOUT * 3)
        assert r.server.parked(r.entry.uuid) == 1
        mobile = r.server.connect()
        mobile.sendall(mobile_head(r.server, r.entry))
        assert recv_until(parked, HEAD_END).startswith(b"POST /check ")
        parked.close()
        assert_closed_within(mobile, 2.0)
        mobile.close()
        r.check_recovered()


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\n",
                                  b"CONNECT uuid:x?response=1", b"GET / HTTP/1.1\r\n\r\n"])
def test_a_stalled_head_is_cut_at_the_head_timeout(tmp_path: Path, sent: bytes) -> None:
    with relay(tmp_path) as r:
        sock = r.server.connect()
        started = time.monotonic()
        sock.sendall(sent)
        answer = assert_closed_within(sock, HEAD_TIMEOUT + SLACK)
        elapsed = time.monotonic() - started
        sock.close()
        assert elapsed >= HEAD_TIMEOUT * 0.8, elapsed
        if sent.endswith(HEAD_END):  # answered (401, keep-alive), then idle: a plain close
            assert answer.startswith(b"HTTP/1.1 401 ") and answer.endswith(HEAD_END), answer
        elif sent:
            assert answer.startswith(b"HTTP/1.1 408 "), answer
        else:
            assert answer == b""
        r.check_recovered()


def test_a_stalled_connect_lookup_is_cut_at_the_head_timeout(tmp_path: Path) -> None:
    """A registry that hangs must not hold a CONNECT longer than the head timeout (the answer
    is a close), and the lookup's task must park nothing when it returns late."""
    registry = SlowRegistry(0.1)  # quick for the warm-up pairing ...
    with relay(tmp_path, registry=registry, entry_cache=0) as r:  # (no entry kept in memory)
        registry.delay = 1.5  # ... then it hangs
        sock = r.server.connect()
        token = current_token(r.entry.base32, r.entry.step, r.entry.digits)
        started = time.monotonic()
        sock.sendall(f"CONNECT uuid:{r.entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        answer = assert_closed_within(sock, HEAD_TIMEOUT + SLACK)
        assert time.monotonic() - started < HEAD_TIMEOUT + SLACK
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
        sock.close()
        registry.delay = 0.1  # for the check's own pairing; the stalled lookup sleeps on
        r.check_recovered(timeout=5.0)  # waits out the stalled lookup's task too
        assert r.server.parked() == 0


# Half-closes --------------------------------------------------------------------------------


def close_notify(sock: ssl.SSLSocket) -> None:
    """A TLS half-close: send close_notify (and take the relay's, which follows at once)."""
    sock.settimeout(3)
    with contextlib.suppress(OSError, ValueError):
        sock.unwrap()


def tcp_fin(sock: ssl.SSLSocket) -> None:
    """A TCP half-close under TLS: a FIN without close_notify (a truncation, to TLS)."""
    socket.socket.shutdown(sock, socket.SHUT_WR)


@pytest.mark.parametrize("how", [close_notify, tcp_fin], ids=["close_notify", "fin"])
@pytest.mark.parametrize("side", ["mobile", "hidden"])
def test_a_half_close_delivers_everything_sent_before_it(
        tmp_path: Path, side: str, how: Callable[[ssl.SSLSocket], None]) -> None:
    payload = random.Random(11).randbytes(3 * MiB)
    with relay(tmp_path) as r:
        mobile, hidden, rest = pair(r.server, r.entry)
        assert rest == b""
        sender, receiver = (mobile, hidden) if side == "mobile" else (hidden, mobile)
        try:
            def send_then_half_close() -> None:
                sender.sendall(payload)
                how(sender)

            thread, outcome = run_in_thread(send_then_half_close)
            receiver.settimeout(10)
            received = recv_exactly(receiver, len(payload))
            assert received == payload
            assert_closed_within(receiver, 3.0)  # TLS cannot half-close: the other leg ends
            assert joined(thread, outcome, 5.0) is None
        finally:
            mobile.close()
            hidden.close()
        r.check_recovered()


@pytest.mark.parametrize("flooder", ["hidden", "mobile"])
def test_a_fin_from_a_non_reader_while_the_peer_floods_ends_the_pair(
        tmp_path: Path, flooder: str) -> None:
    """One side floods; the other reads nothing, then sends a FIN. The relay must end the pair
    within its TLS shutdown timeout (plus slack): both legs closed, the writer not hanging."""
    with relay(tmp_path) as r:
        mobile, hidden, _ = pair(r.server, r.entry)
        writer, quitter = (hidden, mobile) if flooder == "hidden" else (mobile, hidden)
        try:
            flood = Flood(writer, 128 * MiB)  # more than loopback's kernel buffers hold
            blocked_at = flood.wait_blocked()  # the relay holds bytes for the quitter
            assert blocked_at < flood.total, "the flood never blocked"
            tcp_fin(quitter)
            wait_for_baseline(r.server, replace(r.baseline, fds=r.baseline.fds + 2,
                                                tasks=r.baseline.tasks),
                              timeout=SSL_SHUTDOWN_TIMEOUT + 3.0)
            flood.wait_ended(timeout=1.0)
        finally:
            if flood.thread.is_alive():
                flood.stop()
            mobile.close()
            hidden.close()
        r.check_recovered()


# Floods at a reader that reads nothing --------------------------------------------------------


@pytest.mark.parametrize("flooder", ["hidden", "mobile"])
@pytest.mark.parametrize("end", ["reader-drains", "reader-resets", "writer-resets"])
def test_a_flood_at_a_non_reader_is_held_back_with_bounded_memory(
        tmp_path: Path, flooder: str, end: str) -> None:
    # More than loopback's kernel buffers can hold: the relay's receive buffer on the writer's
    # leg autotunes up to tcp_rmem's maximum (32 MiB here) while it still reads, so tens of
    # MiB may sit in kernel queues. What must stay small is the relay's own memory.
    total = 128 * MiB
    with relay(tmp_path) as r:
        mobile, hidden, rest = pair(r.server, r.entry)
        assert rest == b""
        writer, reader = (hidden, mobile) if flooder == "hidden" else (mobile, hidden)
        try:
            rss_before = vm_rss()
            flood = Flood(writer, total)
            blocked_at = flood.wait_blocked()
            rss_blocked = vm_rss()
            assert rss_blocked - rss_before < 32 * MiB, (rss_before, rss_blocked)
            assert blocked_at <= total - 48 * MiB, f"{blocked_at} bytes went to a non-reader"
            if end == "reader-drains":
                assert receive_all(reader, total) == flood.expected_sha256()
                assert joined(flood.thread, flood.outcome, 10.0) == total
            elif end == "reader-resets":
                reset(reader)
                flood.wait_ended()
                assert_closed_within(writer, 2.0)
            else:
                flood.stop()
                reset(writer)  # with megabytes in flight towards the reader
                # The reader gets a prefix of what was sent, in order, then the close.
                data, closed = read_to_close(reader, 5.0, limit=total)
                assert closed
                assert len(data) <= flood.sent
                assert data == flood.stream(len(data))
        finally:
            mobile.close()
            hidden.close()
        r.check_recovered()


# TLS handshakes that fail or never finish -----------------------------------------------------


def test_garbage_instead_of_a_client_hello_is_closed_at_once(tmp_path: Path) -> None:
    with relay(tmp_path) as r:
        for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(600),
                        b"\x16\x03\x01\xff\xff" + os.urandom(100), b"\x00" * 5000):
            with raw_connect(r.server) as sock:
                started = time.monotonic()
                with contextlib.suppress(OSError):
                    sock.sendall(garbage)
                assert_closed_within(sock, 2.0)
                assert time.monotonic() - started < HEAD_TIMEOUT, "closed only at the timeout"
        r.check_recovered()


@pytest.mark.parametrize("what", ["nothing", "half-hello", "hello-only"])
def test_a_handshake_that_never_finishes_is_cut_at_the_head_timeout(
        tmp_path: Path, what: str) -> None:
    hello = client_hello()
    with relay(tmp_path) as r:
        with raw_connect(r.server) as sock:
            started = time.monotonic()
            if what == "half-hello":
                sock.sendall(hello[: len(hello) // 2])
            elif what == "hello-only":
                sock.sendall(hello)  # the relay answers; we never send our Finished
            assert_closed_within(sock, HEAD_TIMEOUT + SLACK)
            assert time.monotonic() - started >= HEAD_TIMEOUT * 0.8
        r.check_recovered()


def test_a_reset_in_the_middle_of_a_handshake(tmp_path: Path) -> None:
    hello = client_hello()
    with relay(tmp_path) as r:
        for cut in (0, 10, len(hello) // 2, len(hello)):
            sock = raw_connect(r.server)
            sock.sendall(hello[:cut])
            time.sleep(0.02)
            reset(sock)
        r.check_recovered()


def test_a_corrupt_tls_record_mid_stream_closes_the_pair(tmp_path: Path) -> None:
    with relay(tmp_path) as r:
        for corrupt_side in ("mobile", "hidden"):
            mobile, hidden, _ = pair(r.server, r.entry)
            bad, good = (mobile, hidden) if corrupt_side == "mobile" else (hidden, mobile)
            try:
                bad.sendall(b"fine")
                assert recv_exactly(good, 4) == b"fine"
                # Bytes under the TLS layer: an application-data record with a broken tag.
                socket.socket.sendall(bad, b"\x17\x03\x03\x00\x20" + os.urandom(32))
                assert_closed_within(good, 2.0)
            finally:
                mobile.close()
                hidden.close()
        r.check_recovered()


def test_a_client_hello_naming_another_host_still_parks(tmp_path: Path) -> None:
    with relay(tmp_path) as r:
        context = ssl.create_default_context(cafile=str(r.server.tls.cert_file))  # type: ignore[union-attr]
        context.check_hostname = False
        raw = raw_connect(r.server)
        sock = context.wrap_socket(raw, server_hostname="not-this-relay.example")
        token = current_token(r.entry.base32, r.entry.step, r.entry.digits)
        sock.sendall(f"CONNECT uuid:{r.entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        assert recv_exactly(sock, len(PARKED)) == PARKED
        sock.close()
        r.check_recovered()


def test_hundreds_of_stuck_peers_do_not_delay_a_pairing(tmp_path: Path) -> None:
    """500 peers from eight addresses hold half-finished handshakes and half-sent heads; a
    real park + pair meanwhile is as quick as ever, and all of them are cut at the timeout."""
    hello = client_hello()
    head_timeout = 3.0
    with relay(tmp_path, head_timeout=head_timeout) as r:
        stuck: list[socket.socket] = []
        try:
            started = time.monotonic()
            for index in range(500):
                source = f"127.0.0.{2 + index % 8}"
                kind = index % 4
                if kind == 3:  # a finished handshake and half a head
                    sock: socket.socket = r.server.connect(source=source)
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: slow\r\n")
                else:
                    sock = raw_connect(r.server, source=source)
                    if kind == 1:
                        sock.sendall(hello[: len(hello) // 2])
                    elif kind == 2:
                        sock.sendall(hello)
                stuck.append(sock)
            opened = time.monotonic() - started
            assert opened < head_timeout - 1, f"opening them took {opened:.1f} s"
            paired = time.monotonic()
            assert_pairing_works(r.server, r.entry)
            assert time.monotonic() - paired < 0.5, "the stuck peers delayed a pairing"
            assert r.server.open_connections() >= 125  # the half heads are being held
            # The relay cuts every one of them at the timeout, on its own.
            for sock in stuck:
                assert_closed_within(sock, head_timeout + 3.0 - (time.monotonic() - started))
        finally:
            for sock in stuck:
                sock.close()
        r.check_recovered(timeout=10.0)


# A Redis outage ---------------------------------------------------------------------------------


class RedisProcess:
    """A redis-server of this test's own, stoppable and restartable on the same port; its data
    survives a crash (append-only file, fsync always)."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
                "--logfile", str(self.folder / "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", self.port, 10.0, self.proc)
            deadline = time.monotonic() + 10
            while True:
                client = redis.Redis.from_url(self.url, socket_timeout=1)
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass  # still loading
                finally:
                    client.close()
                assert time.monotonic() < deadline, "redis-server does not answer PING"
                time.sleep(0.05)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"redis-server did not start: {exc}\n{tail(self.folder / 'redis.log')}")

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def connect_answer(server: ServerThread, entry: Entry) -> tuple[bytes, ssl.SSLSocket]:
    """Send a good CONNECT; (the relay's first answer, the socket)."""
    sock = server.connect()
    token = current_token(entry.base32, entry.step, entry.digits)
    sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
    sock.settimeout(10)
    answer = sock.recv(4096)
    assert isinstance(sock, ssl.SSLSocket)
    return answer, sock


def test_a_redis_outage_refuses_new_connects_clearly_and_spares_active_pairs(
        tmp_path: Path) -> None:
    store = RedisProcess(tmp_path)
    store.start()
    try:
        registry = open_registry(store.url)
        with running_server(tmp_path, registry=registry, head_timeout=10.0, pair_wait=0.5,
                            guesses=GuessLimits(per_address_burst=1000)) as server, \
                LoopErrors(server) as errors:
            entry = server.add_entry()
            assert_pairing_works(server, entry)
            mobile, hidden, _ = pair(server, entry)
            spare = server.park(entry)  # parked before the outage: stays usable
            server.wait_parked(entry.uuid, 1)
            try:
                mobile.sendall(b"before")
                assert recv_exactly(hidden, 6) == b"before"

                store.crash()
                for _ in range(3):  # every new CONNECT: a clear 503, at once
                    started = time.monotonic()
                    answer, sock = connect_answer(server, entry)
                    assert answer.startswith(b"HTTP/1.1 503\r\n"), answer
                    rest = recv_until(sock, b"}}") if not answer.endswith(b"}}") else b""
                    assert b'"diagnostic":"registry unavailable"' in answer + rest
                    assert time.monotonic() - started < 5.0
                    sock.close()
                # The active pair relays on, both ways, and bulk.
                payload = random.Random(5).randbytes(2 * MiB)
                sender, outcome = run_in_thread(lambda: mobile.sendall(payload))
                hidden.settimeout(10)
                assert recv_exactly(hidden, len(payload)) == payload
                joined(sender, outcome, 5.0)
                hidden.sendall(b"during")
                assert recv_exactly(mobile, 6) == b"during"
                # A connection parked before the outage still pairs.
                client = server.connect()
                client.sendall(mobile_head(server, entry))
                assert recv_until(spare, HEAD_END).startswith(b"POST /check ")
                spare.sendall(b"spare")
                assert recv_exactly(client, 5) == b"spare"
                client.close()
                spare.close()

                store.start()  # same port, same data: the relay must reconnect by itself
                deadline = time.monotonic() + 10
                while True:
                    answer, sock = connect_answer(server, entry)
                    if answer == PARKED:
                        break
                    sock.close()
                    assert answer.startswith(b"HTTP/1.1 503"), answer
                    assert time.monotonic() < deadline, "the relay did not recover"
                    time.sleep(0.2)
                sock.close()
                hidden.sendall(b"after")
                assert recv_exactly(mobile, 5) == b"after"
            finally:
                mobile.close()
                hidden.close()
            deadline = time.monotonic() + 5
            while server.open_connections():
                assert time.monotonic() < deadline, server.open_connections()
                time.sleep(0.02)
            assert_pairing_works(server, entry)
            hub = server.server.hub
            assert hub is not None
            deadline = time.monotonic() + 5
            while server.sync(lambda: hub.active_pairs) or server.open_connections():
                assert time.monotonic() < deadline, "the last pairing did not end"
                time.sleep(0.02)
            errors.assert_none()
    finally:
        store.stop()
