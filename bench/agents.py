"""The bench's peers, each run as its own process: ``python -m bench.agents ROLE [options]``.

Roles, in pairs that do the same work on both sides of the comparison:

- pairing cycles (asyncio on uvloop, like a real agent and a real client):
  ``hidden`` keeps connections parked at our relay and serves each pairing;
  ``backend`` is haproxy's server and serves each connection the same way;
  ``mobile`` makes cycles against either and measures them.
- bulk transfers (one thread per connection, non-blocking pump: the fastest Python can move bytes):
  ``bulk-hidden``, ``bulk-backend``, ``bulk-mobile``.
- idle connections for haproxy's side of the parked figures: ``idle``.

Long-running roles print JSON lines on stdout (``{"event": "parked", "parked": 120}``) and exit
when their stdin closes or after ``--max-seconds``, whichever comes first. ``mobile`` and
``bulk-mobile`` print one ``{"event": "result", ...}`` line and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import wire

REPORT_INTERVAL = 0.1  # seconds between progress lines
CYCLE_TIMEOUT = 10.0  # one pairing cycle, connect to close
PARK_TIMEOUT = 15.0  # connect, handshake and the relay's 200
RETRY_PAUSE = 0.2  # after a failed park, before the next try


@dataclass(frozen=True, slots=True)
class Identity:
    """A hidden server's ID and TOTP parameters (from ``rendezvous users add --json``)."""

    uuid: str
    base32: str
    step: int
    digits: int

    def record(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "base32": self.base32, "step": self.step,
                "digits": self.digits}


def load_ids(path: str) -> list[Identity]:
    records = json.loads(Path(path).read_text())
    return [Identity(r["uuid"], r["base32"], int(r["step"]), int(r["digits"])) for r in records]


class Tokens:
    """TOTP codes per ID, computed once per time step."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], str] = {}

    def get(self, ident: Identity) -> str:
        from rendezvous.protocol.totp import current_token

        now = time.time()
        key = (ident.uuid, int(now // ident.step))
        token = self._cache.get(key)
        if token is None:
            token = self._cache[key] = current_token(ident.base32, ident.step, ident.digits, now)
        return token


def emit(**fields: Any) -> None:
    """One JSON line to the orchestrator."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def process_cpu() -> float:
    """CPU seconds this process has used since it started (start-up included)."""
    times = os.times()
    return times.user + times.system


def raise_nofile() -> int:
    """Raise the open-file soft limit to the hard one (20,000 on this machine)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def exit_with_stdin(max_seconds: float) -> None:
    """End this process when the orchestrator closes our stdin, or after ``max_seconds``.

    ``os._exit``: the kernel closes every socket at once, with no per-connection goodbye.
    """

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
        os._exit(0)

    def watch_clock() -> None:
        time.sleep(max_seconds)
        emit(event="error", error=f"--max-seconds {max_seconds} reached")
        os._exit(3)

    threading.Thread(target=watch_stdin, daemon=True).start()
    threading.Thread(target=watch_clock, daemon=True).start()


def run_async(main: Coroutine[Any, Any, None]) -> None:
    import uvloop

    uvloop.run(main)


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    return wire.client_context() if args.tls else None


# ------------------------------------------------------------------------ asyncio: cycles


async def open_client(port: int, context: ssl.SSLContext | None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection to ``HOST:port`` whose close leaves no TIME_WAIT (see wire)."""
    reader, writer = await asyncio.open_connection(wire.HOST, port, ssl=context)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, wire.LINGER_ZERO)
    return reader, writer


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5.0)


async def serve_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      head: bytes) -> None:
    """Answer one request (a pairing's, or haproxy's connection's) and close."""
    try:
        up, down = wire.parse_request(head)
        left = up
        while left > 0:
            chunk = await reader.read(min(left, wire.RECV_BUFFER))
            if not chunk:
                raise ConnectionError("body cut short")
            left -= len(chunk)
        writer.write(wire.response_head(down))
        left = down
        while left > 0:
            n = min(left, wire.SEND_CHUNK)
            writer.write(wire.ZEROS[:n])
            left -= n
            await writer.drain()
        await writer.drain()
        if writer.can_write_eof():
            # Plain TCP: end our side and wait for the peer's end before the (resetting) close.
            writer.write_eof()
            async with asyncio.timeout(5.0):
                while await reader.read(65536):
                    pass
    except (OSError, ssl.SSLError, ValueError, ConnectionError, TimeoutError,
            asyncio.IncompleteReadError):
        pass
    finally:
        await close_writer(writer)


class Progress:
    """Counts reported to the orchestrator every REPORT_INTERVAL while they change."""

    def __init__(self, **counts: int) -> None:
        self.counts = dict(counts)
        self._last: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    async def report_forever(self, event: str) -> None:
        while True:
            if self.counts != self._last:
                self._last = dict(self.counts)
                emit(event=event, **self._last)
            await asyncio.sleep(REPORT_INTERVAL)


async def hidden_main(args: argparse.Namespace) -> None:
    """Keep ``--per-id`` connections parked for each ID; serve each pairing, park a new one."""
    ids = load_ids(args.ids)
    context = tls_context(args)
    tokens = Tokens()
    progress = Progress(parked=0, served=0, errors=0)
    handshakes = asyncio.Semaphore(args.ramp)  # parks in flight at once
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    head: bytes) -> None:
        await serve_async(reader, writer, head)
        progress.add("served")

    async def slot(ident: Identity) -> None:
        while True:
            writer: asyncio.StreamWriter | None = None
            try:
                async with handshakes:
                    async with asyncio.timeout(PARK_TIMEOUT):
                        reader, writer = await open_client(args.port, context)
                        writer.write(wire.connect_head(ident.uuid, tokens.get(ident)))
                        answer = await reader.readexactly(len(wire.PARKED))
                if answer != wire.PARKED:
                    raise ConnectionError(f"park refused: {answer!r}")
                progress.add("parked")
                try:
                    head = await reader.readuntil(wire.HEAD_END)
                finally:
                    progress.add("parked", -1)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError,
                    asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                progress.add("errors")
                if writer is not None:
                    spawn(close_writer(writer))
                await asyncio.sleep(RETRY_PAUSE)
                continue
            spawn(serve(reader, writer, head))

    slots = [asyncio.create_task(slot(i)) for i in ids for _ in range(args.per_id)]
    await progress.report_forever("parked")
    del slots


async def backend_main(args: argparse.Namespace) -> None:
    """haproxy's server: answer each connection as the hidden server answers a pairing."""
    context = wire.server_context(Path(args.cert), Path(args.key)) if args.tls else None
    progress = Progress(accepted=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        progress.add("accepted")
        try:
            head = await asyncio.wait_for(reader.readuntil(wire.HEAD_END), 600)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            await close_writer(writer)
            return
        await serve_async(reader, writer, head)

    server = await asyncio.start_server(handle, wire.HOST, args.port, ssl=context, backlog=4096)
    emit(event="listening", port=args.port)
    async with server:
        await progress.report_forever("backend")


async def mobile_main(args: argparse.Namespace) -> None:
    """``--concurrency`` clients making pairing cycles back to back; one result line.

    A cycle: connect (TLS handshake), send the request, read the whole answer (its latency ends
    here), then wait for the close that ends it. The first ``--warmup`` cycles are not counted;
    the rate is counted cycles over the span from the first counted start to the last end.
    """
    ids = load_ids(args.ids) if args.ids else []
    context = tls_context(args)
    expected = wire.response_size(wire.SMALL)
    latencies: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    errors: list[str] = []
    cipher: list[Any] = []
    started = 0
    budget = args.warmup + args.count

    async def cycle(uuid: str | None) -> float:
        t0 = time.perf_counter()
        reader, writer = await open_client(args.port, context)
        try:
            writer.write(wire.request_head(uuid, 0, wire.SMALL, args.auth))
            answer = await reader.readexactly(expected)
            latency = time.perf_counter() - t0
            if not answer.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"answer {answer[:40]!r}")
            if not cipher:
                cipher.append(writer.get_extra_info("cipher"))
            await reader.read(1)  # the close that ends the cycle: EOF from the relay
            return latency
        finally:
            await close_writer(writer)

    async def worker(index: int, deadline: float) -> None:
        nonlocal started
        uuid = ids[index % len(ids)].uuid if ids else None
        while started < budget and time.monotonic() < deadline:
            started += 1
            counted = started > args.warmup
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(CYCLE_TIMEOUT):
                    latency = await cycle(uuid)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError,
                    asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > args.count // 10 + 10:
                    return  # something is broken: do not hammer it until the deadline
                await asyncio.sleep(RETRY_PAUSE)
                continue
            if counted:
                latencies.append(latency)
                starts.append(t0)
                ends.append(time.perf_counter())

    deadline = time.monotonic() + args.seconds
    cpu = time.process_time()
    await asyncio.gather(*(worker(i, deadline) for i in range(args.concurrency)))
    cpu = time.process_time() - cpu
    elapsed = max(ends) - min(starts) if ends else 0.0
    emit(event="result", cycles=len(latencies), elapsed=elapsed, total=started,
         errors=len(errors), error_samples=errors[:5], latencies=latencies, cpu=cpu,
         cpu_total=process_cpu(), cipher=cipher[0] if cipher else None)


async def idle_main(args: argparse.Namespace) -> None:
    """Open ``--count`` connections (TLS handshake done) that then say nothing."""
    context = tls_context(args)
    progress = Progress(open=0, errors=0)
    handshakes = asyncio.Semaphore(args.ramp)
    held: list[asyncio.StreamWriter] = []

    async def one() -> None:
        for _ in range(3):
            try:
                async with handshakes, asyncio.timeout(PARK_TIMEOUT):
                    _, writer = await open_client(args.port, context)
            except (OSError, ssl.SSLError, TimeoutError):
                progress.add("errors")
                await asyncio.sleep(RETRY_PAUSE)
                continue
            held.append(writer)
            progress.add("open")
            return

    tasks = [asyncio.create_task(one()) for _ in range(args.count)]
    await progress.report_forever("idle")
    del tasks


# ------------------------------------------------------------------------ threads: bulk


def serve_sync(sock: socket.socket, head: bytes, leftover: bytes, deadline: float) -> None:
    """Answer one bulk request on a blocking socket, then close with a TLS goodbye."""
    try:
        up, down = wire.parse_request(head)
        wire.pump(sock, prefix=wire.response_head(down, wire.wants_raw(head)), send=down,
                  recv=max(0, up - len(leftover)), deadline=deadline,
                  send_after_recv=down == 0)
    finally:
        wire.close_quietly(sock)


def bulk_hidden_main(args: argparse.Namespace) -> None:
    """Keep ``--per-id`` connections parked per ID, one thread each; serve and re-park."""
    ids = load_ids(args.ids)
    context = tls_context(args)
    tokens = Tokens()
    lock = threading.Lock()
    counts = {"parked": 0, "served": 0, "errors": 0}

    def add(name: str, n: int = 1) -> None:
        with lock:
            counts[name] += n
            emit(event="parked", **counts)

    def slot(ident: Identity) -> None:
        while True:
            try:
                with lock:
                    token = tokens.get(ident)
                sock = wire.connect(args.port, context, timeout=PARK_TIMEOUT)
            except OSError:
                add("errors")
                time.sleep(RETRY_PAUSE)
                continue
            try:
                sock.sendall(wire.connect_head(ident.uuid, token))
                if wire.recv_exactly(sock, len(wire.PARKED)) != wire.PARKED:
                    raise ConnectionError("park refused")
                add("parked")
                sock.settimeout(None)  # parked: wait as long as it takes
                try:
                    head, leftover = wire.read_head(sock)
                finally:
                    add("parked", -1)
                serve_sync(sock, head, leftover, time.monotonic() + args.transfer_timeout)
                add("served")
            except (OSError, ConnectionError, ValueError):
                add("errors")
                sock.close()
                time.sleep(RETRY_PAUSE)

    for ident in ids:
        for _ in range(args.per_id):
            threading.Thread(target=slot, args=(ident,), daemon=True).start()
    threading.Event().wait()


def bulk_backend_main(args: argparse.Namespace) -> None:
    """haproxy's server for bulk: one thread per connection, the same answer as bulk-hidden."""
    context = wire.server_context(Path(args.cert), Path(args.key)) if args.tls else None
    listener = socket.create_server((wire.HOST, args.port), backlog=1024)

    def handle(raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(PARK_TIMEOUT)
        try:
            sock = context.wrap_socket(raw, server_side=True) if context else raw
            sock.settimeout(600)
            head, leftover = wire.read_head(sock)
        except (OSError, ConnectionError):
            raw.close()
            return
        with contextlib.suppress(OSError, ConnectionError, ValueError):
            serve_sync(sock, head, leftover, time.monotonic() + args.transfer_timeout)

    emit(event="listening", port=args.port)
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=handle, args=(raw,), daemon=True).start()


def bulk_mobile_main(args: argparse.Namespace) -> None:
    """``--streams`` transfers at once, started together; one result line."""
    ids = load_ids(args.ids) if args.ids else []
    context = tls_context(args)
    barrier = threading.Barrier(args.streams)
    spans: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def stream(index: int) -> None:
        uuid = ids[index % len(ids)].uuid if ids else None
        sock: socket.socket | None = None
        try:
            sock = wire.connect(args.port, context)
            barrier.wait(timeout=args.seconds)
            first = bytearray()
            t0 = time.perf_counter()
            wire.pump(sock, prefix=wire.request_head(uuid, args.up, args.down, "basic",
                                                     args.raw),
                      send=args.up, recv=wire.response_size(args.down, args.raw),
                      deadline=deadline, first=first)
            t1 = time.perf_counter()
            if not first.startswith(b"HTTP/1.1 101" if args.raw else b"HTTP/1.1 200"):
                raise ConnectionError(f"answer {bytes(first)!r}")
            with lock:
                spans.append((t0, t1))
        except (OSError, ConnectionError, threading.BrokenBarrierError) as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()
        finally:
            if sock is not None:
                wire.close_quietly(sock, goodbye=False)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(args.streams)]
    cpu = time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu
    moved = len(spans) * (args.up + args.down)
    elapsed = (max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)) if spans else 0.0
    emit(event="result", bytes=moved, elapsed=elapsed, streams=len(spans), errors=len(errors),
         error_samples=errors[:5], cpu=cpu, cpu_total=process_cpu())


# ------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.agents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True)

    def role(name: str, main: Callable[[argparse.Namespace], None],
             long_running: bool) -> argparse.ArgumentParser:
        p = roles.add_parser(name)
        p.set_defaults(main=main, long_running=long_running)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--tls", action="store_true")
        p.add_argument("--max-seconds", type=float, default=900.0)
        return p

    p = role("hidden", lambda a: run_async(hidden_main(a)), True)
    p.add_argument("--ids", required=True, help="JSON list of {uuid, base32, step, digits}")
    p.add_argument("--per-id", type=int, default=1)
    p.add_argument("--ramp", type=int, default=64, help="parks in flight at once")

    for name, main in (("backend", lambda a: run_async(backend_main(a))),
                       ("bulk-backend", bulk_backend_main)):
        p = role(name, main, True)
        p.add_argument("--cert", default="")
        p.add_argument("--key", default="")
        p.add_argument("--transfer-timeout", type=float, default=120.0)

    p = role("mobile", lambda a: run_async(mobile_main(a)), False)
    p.add_argument("--ids", default="", help="IDs to ask for, round robin (none for haproxy)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--auth", choices=("digest", "basic"), default="digest")

    p = role("idle", lambda a: run_async(idle_main(a)), True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--ramp", type=int, default=64)

    p = role("bulk-hidden", bulk_hidden_main, True)
    p.add_argument("--ids", required=True)
    p.add_argument("--per-id", type=int, default=1)
    p.add_argument("--transfer-timeout", type=float, default=120.0)

    p = role("bulk-mobile", bulk_mobile_main, False)
    p.add_argument("--ids", default="")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--up", type=int, default=0)
    p.add_argument("--down", type=int, default=0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--raw", action="store_true",
                   help="a raw download: answered 101, then the bytes unframed")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise_nofile()
    if args.long_running:
        exit_with_stdin(args.max_seconds)
    args.main(args)


if __name__ == "__main__":
    main()
