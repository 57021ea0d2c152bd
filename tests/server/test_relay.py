"""The paired byte stream (docs/protocol.md §2-3): raw TLS sockets on both legs of the relay.

A hidden leg is a connection parked with ``s.park(entry)``; a mobile leg is a raw TLS connection
that sends a request head naming the ID. After pairing, whatever one side writes the other reads,
in order, with flow control, and a close on one side closes the other.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import websockets.sync.client
from harness import ServerThread, recv_exactly, recv_until, run_in_thread, running_server
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from rendezvous.registry import Entry

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CHUNK = 256 * 1024
HEAD_END = b"\r\n\r\n"


def basic(uuid: str) -> str:
    return "Basic " + base64.b64encode(f"{uuid}:x".encode()).decode()


# After a 101 the paired stream is raw bytes both ways (docs/protocol.md §2).
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n"


def pair(server: ServerThread, entry: Entry, extra: bytes = b""
         ) -> tuple[ssl.SSLSocket, ssl.SSLSocket, bytes]:
    """Park a hidden leg, pair a mobile leg with it by an Upgrade that the hidden leg answers
    with a 101, so that the stream is raw; return (mobile, hidden, bytes the hidden leg read
    past the forwarded head)."""
    hidden = server.park(entry)
    mobile = server.connect()
    head = (f"POST /stream HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: {basic(entry.uuid)}\r\nUpgrade: raw\r\nConnection: Upgrade\r\n"
            "\r\n").encode()
    mobile.sendall(head + extra)
    received = recv_until(hidden, HEAD_END)
    end = received.index(HEAD_END) + len(HEAD_END)
    forwarded, rest = received[:end], received[end:]
    assert forwarded.startswith(b"POST /stream HTTP/1.1\r\n"), forwarded
    assert b"authorization" not in forwarded.lower(), forwarded
    hidden.sendall(SWITCHED)
    assert recv_exactly(mobile, len(SWITCHED)) == SWITCHED
    assert isinstance(mobile, ssl.SSLSocket) and isinstance(hidden, ssl.SSLSocket)
    return mobile, hidden, rest


def result_of(thread: threading.Thread, outcome: list[Any], timeout: float) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), f"thread still running after {timeout} s"
    (value,) = outcome
    if isinstance(value, BaseException):
        raise value
    return value


def duplex(sock: ssl.SSLSocket, outgoing: bytes, incoming: int, already: bytes = b"",
           timeout: float = 30.0) -> str:
    """Send ``outgoing`` while receiving ``incoming`` bytes, on one thread (an SSL object must
    not be used by two threads at once); return the sha256 of what was received."""
    digest = hashlib.sha256(already)
    got, sent = len(already), 0
    view = memoryview(outgoing)
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while sent < len(outgoing) or got < incoming:
        if time.monotonic() > deadline:
            raise AssertionError(f"duplex stalled: sent {sent}, received {got} of {incoming}")
        busy = False
        if sent < len(outgoing):
            try:
                # After a want-write, the retry sends the same bytes again, as OpenSSL needs.
                sent += sock.send(view[sent:sent + CHUNK])
                busy = True
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
        while got < incoming:
            try:
                data = sock.recv(CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            if not data:
                raise AssertionError(f"peer closed after {got} of {incoming} bytes")
            digest.update(data)
            got += len(data)
            busy = True
        if not busy and not sock.pending():
            select.select([sock], [sock] if sent < len(outgoing) else [], [], 0.05)
    assert got == incoming
    return digest.hexdigest()


def assert_closes_within(sock: socket.socket, seconds: float) -> None:
    """The peer's close reaches ``sock`` (EOF or a reset) within ``seconds``."""
    deadline = time.monotonic() + seconds
    sock.settimeout(seconds)
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"not closed within {seconds} s"
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"not closed within {seconds} s") from None
        except OSError:
            return  # reset, or a TLS error on a cut stream: closed either way
        if not data:
            return
        raise AssertionError(f"unexpected bytes instead of a close: {data[:100]!r}")


def vm_rss() -> int:
    """This process's resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# WebSocket ------------------------------------------------------------------------------


def websocket_echo(sock: ssl.SSLSocket, seen: list[Request], max_reads: int = 10_000) -> None:
    """A hidden WebSocket server on a paired socket: accept the handshake, echo every message,
    answer the close. Runs websockets' sans-I/O ServerProtocol."""
    protocol = ServerProtocol()
    sock.settimeout(10)
    try:
        for _ in range(max_reads):
            data = sock.recv(65536)
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            for event in protocol.events_received():
                if isinstance(event, Request):
                    seen.append(event)
                    response = protocol.accept(event)
                    assert response.status_code == 101, protocol.handshake_exc
                    protocol.send_response(response)
                elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    protocol.send_text(event.data)
                elif isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                    protocol.send_binary(event.data)
            for out in protocol.data_to_send():
                if out:
                    sock.sendall(out)
                else:
                    return  # the protocol asks us to close the TCP connection
            if not data or protocol.close_expected():
                return
        raise AssertionError("echo server read too often")
    finally:
        sock.close()


@pytest.mark.parametrize("naming", ["basic", "query"])
def test_websocket_echo_through_the_relay(tmp_path: Path, naming: str) -> None:
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        seen: list[Request] = []
        parked = s.park(entry)
        assert isinstance(parked, ssl.SSLSocket)
        thread, outcome = run_in_thread(lambda: websocket_echo(parked, seen))
        base = f"wss://127.0.0.1:{s.port}/chat"
        if naming == "basic":
            uri, headers = base, {"Authorization": basic(entry.uuid)}
        else:
            uri, headers = f"{base}?rendezvous={entry.uuid}", {}
        big = random.Random(3).randbytes(512 * 1024)
        with websockets.sync.client.connect(uri, ssl=s.client_context(),
                                            additional_headers=headers,
                                            open_timeout=5, close_timeout=2) as ws:
            for text in ["hello", "ünïcödé", "x" * 70_000]:
                ws.send(text)
                assert ws.recv(timeout=5) == text
            ws.send(big)
            assert ws.recv(timeout=5) == big
        result_of(thread, outcome, 5)
        (request,) = seen
        assert request.path == ("/chat" if naming == "basic"
                                else f"/chat?rendezvous={entry.uuid}")
        assert "Authorization" not in request.headers


def test_upgrade_and_first_frame_in_one_write_both_arrive(tmp_path: Path) -> None:
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        hidden = s.park(entry)
        mobile = s.connect()
        key = base64.b64encode(os.urandom(16)).decode()
        head = (f"GET /ws?rendezvous={entry.uuid} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{s.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        frame = Frame(Opcode.TEXT, b"early bird").serialize(mask=True)
        mobile.sendall(head + frame)  # one write: the frame rides with the head

        received = recv_until(hidden, HEAD_END)
        end = received.index(HEAD_END) + len(HEAD_END)
        rest = received[end:]
        if len(rest) < len(frame):
            rest += recv_exactly(hidden, len(frame) - len(rest))
        assert received[:end] == head, received[:end]
        assert rest == frame

        protocol = ServerProtocol()
        protocol.receive_data(received[:end] + rest)
        request, first = protocol.events_received()
        assert isinstance(request, Request) and isinstance(first, Frame)
        assert first.opcode is Opcode.TEXT and first.data == b"early bird"
        protocol.send_response(protocol.accept(request))
        protocol.send_text(first.data)
        for out in protocol.data_to_send():
            hidden.sendall(out)

        answer = recv_until(mobile, HEAD_END)
        end = answer.index(HEAD_END) + len(HEAD_END)
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        echoed = answer[end:]
        expected = Frame(Opcode.TEXT, b"early bird").serialize(mask=False)
        if len(echoed) < len(expected):
            echoed += recv_exactly(mobile, len(expected) - len(echoed))
        assert echoed == expected
        mobile.close()
        hidden.close()


# Bulk and flow control ------------------------------------------------------------------


def test_32_mebibytes_each_way_at_once(tmp_path: Path) -> None:
    up = random.Random(1).randbytes(32 * MiB)
    down = random.Random(2).randbytes(32 * MiB)
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        first = up[:CHUNK]  # sent with the head: it must arrive too
        mobile, hidden, rest = pair(s, entry, extra=first)
        try:
            mobile_thread, mobile_out = run_in_thread(
                lambda: duplex(mobile, up[len(first):], len(down)))
            hidden_thread, hidden_out = run_in_thread(
                lambda: duplex(hidden, down, len(up), already=rest))
            from_hidden = result_of(mobile_thread, mobile_out, 40)
            from_mobile = result_of(hidden_thread, hidden_out, 40)
        finally:
            mobile.close()
            hidden.close()
    assert from_mobile == hashlib.sha256(up).hexdigest()
    assert from_hidden == hashlib.sha256(down).hexdigest()


def test_slow_reader_slows_the_writer_and_loses_nothing(tmp_path: Path) -> None:
    size = 128 * MiB  # far more than loopback's kernel buffers (up to ~40 MiB here) hold
    payload = random.Random(4).randbytes(size)
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        mobile, hidden, rest = pair(s, entry)
        assert rest == b""
        hidden.settimeout(30)
        mobile.settimeout(30)
        progress = [0]

        def send() -> None:
            view = memoryview(payload)
            for start in range(0, size, MiB):
                hidden.sendall(view[start:start + MiB])
                progress[0] = start + MiB

        try:
            rss_before = vm_rss()
            sender, outcome = run_in_thread(send)
            time.sleep(1.0)  # the mobile side reads nothing
            stalled_at, rss_stalled = progress[0], vm_rss()
            digest = hashlib.sha256()
            got = 0
            deadline = time.monotonic() + 30
            while got < size:
                assert time.monotonic() < deadline, f"received {got} of {size}"
                data = mobile.recv(CHUNK)
                assert data, f"closed after {got} of {size} bytes"
                digest.update(data)
                got += len(data)
            result_of(sender, outcome, 10)
        finally:
            mobile.close()
            hidden.close()
    assert got == size
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    # Back-pressure held the writer: only socket buffers' worth went out during the stall.
    assert stalled_at < size // 2, f"{stalled_at} bytes sent while the reader slept"  # blocked
    assert rss_stalled - rss_before < 64 * MiB, (rss_before, rss_stalled)


def test_body_sent_while_waiting_for_a_park_arrives_whole(tmp_path: Path) -> None:
    """A mobile client that arrives before any connection is parked keeps sending its body
    (more than the relay buffers while waiting); once a hidden leg parks, all of it arrives."""
    body = random.Random(6).randbytes(32 * MiB)
    with running_server(tmp_path, pair_wait=3.0) as s:
        entry = s.add_entry()
        mobile = s.connect()
        mobile.settimeout(10)
        head = (f"PUT /late HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n"
                f"Authorization: {basic(entry.uuid)}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sender, outcome = run_in_thread(lambda: mobile.sendall(head + body))
        hidden: socket.socket | None = None
        try:
            time.sleep(0.5)  # the client waits, sending, with nothing parked
            assert sender.is_alive(), "the relay read the whole body while waiting"
            hidden = s.park(entry)
            hidden.settimeout(10)
            received = recv_until(hidden, HEAD_END)
            end = received.index(HEAD_END) + len(HEAD_END)
            assert received[:end] == head.replace(
                f"Authorization: {basic(entry.uuid)}\r\n".encode(), b"")
            rest = received[end:]
            rest += recv_exactly(hidden, len(body) - len(rest))
            result_of(sender, outcome, 10)
            assert rest == body
        finally:
            mobile.close()
            if hidden is not None:
                hidden.close()


# Closing --------------------------------------------------------------------------------


def test_closing_the_mobile_side_closes_the_hidden_side(tmp_path: Path) -> None:
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        mobile, hidden, _ = pair(s, entry)
        mobile.sendall(b"ping")
        assert recv_exactly(hidden, 4) == b"ping"
        mobile.close()
        try:
            assert_closes_within(hidden, 2.0)
        finally:
            hidden.close()


def test_closing_the_hidden_side_closes_the_mobile_side(tmp_path: Path) -> None:
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        mobile, hidden, _ = pair(s, entry)
        hidden.sendall(b"pong")
        assert recv_exactly(mobile, 4) == b"pong"
        hidden.close()
        try:
            assert_closes_within(mobile, 2.0)
        finally:
            mobile.close()


def test_hidden_side_answer_then_close_is_delivered_whole(tmp_path: Path) -> None:
    """A close right after a write must not cut the write short (flush, then close)."""
    answer = random.Random(5).randbytes(4 * MiB)
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        mobile, hidden, _ = pair(s, entry)
        try:
            hidden.settimeout(10)
            mobile.settimeout(10)

            def answer_and_close() -> None:
                hidden.sendall(answer)
                hidden.close()

            sender, outcome = run_in_thread(answer_and_close)
            received = recv_exactly(mobile, len(answer))
            result_of(sender, outcome, 10)
            assert_closes_within(mobile, 2.0)
        finally:
            mobile.close()
            hidden.close()
    assert received == answer


@pytest.mark.parametrize("first", ["hidden", "mobile"])
def test_every_way_of_ending_a_pair_is_accounted(tmp_path: Path, first: str) -> None:
    """One side closes; the other then sends its own close_notify (as curl does): the pair is
    counted closed with its bytes, whichever order the two ends arrive in."""
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        mobile, hidden, _ = pair(s, entry)
        hidden.sendall(b"pong")
        assert recv_exactly(mobile, 4) == b"pong"
        closer, other = (hidden, mobile) if first == "hidden" else (mobile, hidden)
        closer.close()
        assert_closes_within(other, 2.0)
        with contextlib.suppress(OSError, ValueError):
            other.unwrap()  # type: ignore[attr-defined]
        other.close()
        hub = s.server.hub
        assert hub is not None
        deadline = time.monotonic() + 5
        while s.sync(lambda: hub.active_pairs) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.sync(lambda: hub.active_pairs) == 0
        assert s.sync(lambda: hub.stats.bytes_down) == len(SWITCHED) + 4
        assert s.open_connections() == 0


# Leaks ----------------------------------------------------------------------------------


def test_park_close_cycles_leak_nothing(tmp_path: Path) -> None:
    cycles = 1000
    with running_server(tmp_path, pair_wait=0.5) as s:
        entry = s.add_entry()
        s.park(entry).close()  # warm up: first-use allocations are not leaks
        s.wait_parked(entry.uuid, 0)
        fds, connections = open_fds(), s.open_connections()

        started = time.monotonic()
        for _ in range(cycles):
            s.park(entry).close()
        elapsed = time.monotonic() - started

        deadline = time.monotonic() + 5
        while (open_fds(), s.open_connections(), s.parked()) != (fds, connections, 0):
            assert time.monotonic() < deadline, (
                f"after {cycles} cycles: {open_fds()} fds (was {fds}), "
                f"{s.open_connections()} connections (was {connections}), "
                f"{s.parked()} parked")
            time.sleep(0.02)
    assert elapsed < 30
