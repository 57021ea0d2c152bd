"""Memory that comes back: waves of short hostile connections, and the relay's RSS after them.

    .venv/bin/python -m bench.memory                      # the issue's six waves of 2,000
    .venv/bin/python -m bench.memory --variant glibc --variant jemalloc
    .venv/bin/python -m bench.memory --quick              # two waves of 400, ~20 s (CI form)

For each variant (how the relay's allocator is set up, see VARIANTS) it starts
``python -m rendezvous serve`` on a loopback port with a fresh data folder and sends it waves of
hostile connections, as a scanner does all day: in each wave half the connections send a bare TLS
ClientHello and wait for the ServerHello, the other half finish the handshake and send a request
head that never ends. A wave holds all of them open at once, then closes them all (with a reset,
so no TIME_WAIT is left), and waits until the relay has closed its side too, before the next.
Sources are spread over 127.0.1.x so that no per-address limit refuses them.

It prints, per variant: the relay's RSS at the start (idle, just before the first wave), its
peak (VmHWM), after each wave, and every second for ``--after`` seconds after the last wave; the
peak growth per hostile connection held; and the issue's targets (#14), PASS/MISS:

* RSS back within 64 MiB of the start within a minute of the last wave;
* peak RSS growth per hostile connection at most 50 KiB.

``--json FILE`` writes every figure. Loopback only; every wave is bounded in count and time
(``WAVE_TIMEOUT``); the relay is stopped by its own process id at the end of its variant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import wire

KiB, MiB = 1 << 10, 1 << 20
TARGET_RETURN = 64 * MiB  # the bound on RSS above the start, a minute after the waves
TARGET_PER_CONNECTION = 50 * KiB  # the bound on peak RSS per hostile connection
WAVE_TIMEOUT = 120.0  # one wave (open all, hold, close all, relay quiet) ends within this
CONNECT_TIMEOUT = 20.0  # one hostile connection's connect + handshake + first bytes
START_TIMEOUT = 30.0  # the relay listens by then
STOP_TIMEOUT = 15.0
OPENING = 256  # hostile connections being opened at once (the relay's backlog is 1024)
SOURCES = [f"127.0.1.{n}" for n in range(1, 41)]  # 40 attackers; 50 each of a 2,000 wave
UNFINISHED_HEAD = (b"GET / HTTP/1.1\r\nHost: relay.example\r\nUser-Agent: scanner/1.0\r\n"
                   b"Accept: */*\r\n")  # no blank line: the head never ends
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/"
                  "libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")


@dataclass(frozen=True)
class Variant:
    """One way of running the relay: extra environment and extra ``serve`` flags."""

    name: str
    what: str
    env: dict[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    needs_jemalloc: bool = False


# What was measured (README "Memory that comes back" has the figures). ``glibc`` is the relay
# as it was before #14 (glibc defaults, no trimming); ``default`` is what `rendezvous serve` does
# now; the others isolate one means each.
VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("glibc", "glibc malloc with its defaults (the relay's own trimming off)",
                flags=("--malloc-trim-interval", "0")),
        Variant("default", "what `rendezvous serve` does now (see --malloc-trim-interval)"),
        Variant("jemalloc", "jemalloc through LD_PRELOAD, trimming off",
                flags=("--malloc-trim-interval", "0"), needs_jemalloc=True),
        Variant("jemalloc-bg", "jemalloc through LD_PRELOAD with its background purging "
                "thread (MALLOC_CONF=background_thread:true), trimming off",
                env={"MALLOC_CONF": "background_thread:true"},
                flags=("--malloc-trim-interval", "0"), needs_jemalloc=True),
        Variant("jemalloc-trim", "jemalloc through LD_PRELOAD, purged by the relay (as the unit "
                "and the container run it)", needs_jemalloc=True),
        Variant("arena2", "glibc, MALLOC_ARENA_MAX=2, trimming off",
                env={"MALLOC_ARENA_MAX": "2"}, flags=("--malloc-trim-interval", "0")),
        Variant("mmap128k", "glibc, mmap threshold fixed at 128 KiB (no dynamic growth) and trim "
                "threshold 128 KiB, trimming off",
                env={"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072:"
                     "glibc.malloc.trim_threshold=131072"},
                flags=("--malloc-trim-interval", "0")),
    )
}
DEFAULT_VARIANTS = ("glibc", "default", "jemalloc")


@dataclass(frozen=True)
class Scale:
    waves: int
    per_wave: int
    after: float  # seconds watched after the last wave


# The quick form watches 12 s after its waves: longer than the relay's default 10 s trim
# interval, so that the periodic call is part of what it sees, whether or not a burst trigger
# fired for waves this small.
SCALES = {"full": Scale(6, 2_000, 60.0), "quick": Scale(2, 400, 12.0)}


def jemalloc_path() -> str | None:
    """Debian's libjemalloc2 (``apt-get install libjemalloc2``), if installed."""
    return next((path for path in JEMALLOC_PATHS if Path(path).exists()), None)


# ---------------------------------------------------------------------------- the relay


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((wire.HOST, 0))
        return int(sock.getsockname()[1])


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), ... of ``pid``, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm"):
            key, value = line.split(":", 1)
            found[key] = int(value.split()[0]) * KiB
    return found


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Relay:
    """``rendezvous serve`` as a subprocess with a fresh data folder, and its /proc figures."""

    def __init__(self, workdir: Path, variant: Variant, max_connections: int) -> None:
        self.port = free_port()
        self.log = workdir / f"relay-{variant.name}.log"
        data = workdir / f"data-{variant.name}"
        env = dict(os.environ, **variant.env)
        if variant.needs_jemalloc:
            library = jemalloc_path()
            if library is None:
                raise RuntimeError("jemalloc is not installed (apt-get install libjemalloc2)")
            env["LD_PRELOAD"] = library
        args = [sys.executable, "-m", "rendezvous", "serve", "--host", wire.HOST,
                "--port", str(self.port), "--data-dir", str(data),
                "--max-connections", str(max_connections),
                "--max-per-address", str(max_connections), *variant.flags]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            with contextlib.suppress(OSError), socket.create_connection((wire.HOST, self.port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay does not listen after {START_TIMEOUT} s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return status(self.pid)["VmRSS"]

    def peak(self) -> int:
        return status(self.pid)["VmHWM"]

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL; the exit status (None when it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


# ---------------------------------------------------------------------------- the attackers


def client_hello() -> bytes:
    """The first flight of a real TLS client (Python's OpenSSL defaults)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = wire.client_context().wrap_bio(incoming, outgoing, server_hostname="relay.example")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def hello_only(port: int, source: str, hello: bytes) -> asyncio.StreamWriter:
    """A connection that sends a ClientHello and has the relay's ServerHello back (so the relay
    holds a TLS connection mid-handshake), then never answers."""
    reader, writer = await asyncio.open_connection(wire.HOST, port, local_addr=(source, 0))
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               wire.LINGER_ZERO)
    writer.write(hello)
    if not await reader.read(1):
        raise ConnectionError("closed instead of a ServerHello")
    return writer


async def unfinished_head(port: int, source: str, context: ssl.SSLContext
                          ) -> asyncio.StreamWriter:
    """A connection that finishes the handshake and sends most of a request head."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, wire.LINGER_ZERO)
    raw.setblocking(False)
    raw.bind((source, 0))
    try:
        await asyncio.get_running_loop().sock_connect(raw, (wire.HOST, port))
        _, writer = await asyncio.open_connection(sock=raw, ssl=context,
                                                  server_hostname="relay.example")
    except BaseException:
        raw.close()
        raise
    writer.write(UNFINISHED_HEAD)
    await writer.drain()
    return writer


async def wave(port: int, count: int, relay: Relay) -> dict[str, Any]:
    """Open ``count`` hostile connections (half of each kind), hold them all, close them all,
    and wait until the relay has closed its side of every one."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    hello, context = client_hello(), wire.client_context()
    gate = asyncio.Semaphore(OPENING)
    failures: list[str] = []

    async def one(index: int) -> asyncio.StreamWriter | None:
        source = SOURCES[index % len(SOURCES)]
        async with gate:
            try:
                return await asyncio.wait_for(
                    hello_only(port, source, hello) if index % 2 == 0
                    else unfinished_head(port, source, context), CONNECT_TIMEOUT)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return None

    quiet_files, before = open_files(relay.pid), relay.rss()
    writers = [w for w in await asyncio.gather(*(one(i) for i in range(count))) if w]
    await asyncio.sleep(0.5)  # the last heads reach the relay's parser
    held_rss, peak = relay.rss(), relay.peak()
    held_files = open_files(relay.pid)
    for writer in writers:
        writer.transport.abort()  # a reset: a scanner does not say goodbye
    await asyncio.sleep(0)
    deadline = loop.time() + WAVE_TIMEOUT
    while open_files(relay.pid) > quiet_files + 2 and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return {
        "held": len(writers), "failed": len(failures), "failure_samples": failures[:5],
        "relay_files_held": held_files - quiet_files,
        "rss_before": before, "rss_held": held_rss, "peak": peak, "rss_closed": relay.rss(),
        "per_connection": (held_rss - before) / len(writers) if writers else 0.0,
        "seconds": round(loop.time() - started, 2),
    }


def check_alive(port: int) -> bool:
    """The relay still answers a real client: a TLS request without credentials gets a 401."""
    try:
        sock = wire.connect(port, wire.client_context(), timeout=10.0)
    except OSError:
        return False
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: relay.example\r\n\r\n")
        head, _ = wire.read_head(sock)
    except (OSError, ConnectionError):
        return False
    finally:
        wire.close_quietly(sock)
    return head.startswith(b"HTTP/1.1 401")


# ---------------------------------------------------------------------------- one variant


def client_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop for the attackers when installed: a tenth of asyncio's memory per TLS connection,
    and less CPU taken from the relay on a small machine."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop  # type: ignore[no-any-return,unused-ignore]


def run_variant(variant: Variant, scale: Scale, workdir: Path) -> dict[str, Any]:
    relay = Relay(workdir, variant, max_connections=scale.per_wave + 1_000)
    try:
        time.sleep(1.0)  # start-up garbage settles
        start = relay.rss()
        waves = []
        with asyncio.Runner(loop_factory=client_loop()) as runner:
            for _ in range(scale.waves):
                waves.append(runner.run(wave(relay.port, scale.per_wave, relay)))
        peak = relay.peak()
        after: list[tuple[float, int]] = []
        ended = time.monotonic()
        while (elapsed := time.monotonic() - ended) < scale.after:
            after.append((round(elapsed, 1), relay.rss()))
            time.sleep(min(1.0, scale.after - elapsed))
        after.append((round(time.monotonic() - ended, 1), relay.rss()))
        alive = check_alive(relay.port)
    finally:
        exit_code = relay.stop()
    trims = trims_logged(relay.log)
    back_at = next((t for t, rss in after if rss - start <= TARGET_RETURN), None)
    # The growth while a wave is held, over the RSS just before it: what one hostile connection
    # costs while it lasts (the creep from wave to wave is the other target's business).
    per_connection = max(w["per_connection"] for w in waves)
    return {
        "variant": variant.name, "what": variant.what, "env": variant.env,
        "flags": list(variant.flags), "waves": waves, "start": start, "peak": peak,
        "after": after, "end": after[-1][1], "back_within_target_at": back_at,
        "per_connection": per_connection, "alive_after": alive, "exit_code": exit_code,
        "trims": trims,
        "targets": [
            {"name": f"RSS within {TARGET_RETURN // MiB} MiB of the start "
                     f"{scale.after:.0f} s after the waves",
             "measured": after[-1][1] - start, "target": TARGET_RETURN,
             "passed": after[-1][1] - start <= TARGET_RETURN},
            {"name": f"peak RSS per hostile connection <= {TARGET_PER_CONNECTION // KiB} KiB",
             "measured": per_connection, "target": TARGET_PER_CONNECTION,  # bytes
             "passed": per_connection <= TARGET_PER_CONNECTION},
        ],
    }


def trims_logged(log: Path) -> dict[str, Any]:
    """The relay's ``memory trimmed`` lines (each a call that gave back 8 MiB or more): how
    many, the MiB they gave back, and the longest one's milliseconds (the loop's pause)."""
    found = [dict(field.split("=", 1) for field in line.split() if "=" in field)
             for line in log.read_text(errors="replace").splitlines()
             if " memory trimmed " in f" {line} "]
    return {"logged": len(found),
            "released_mib": round(sum(float(f.get("released_mib", 0)) for f in found), 1),
            "max_ms": max((float(f.get("ms", 0)) for f in found), default=0.0)}


def mib(value: float) -> str:
    return f"{value / MiB:.0f} MiB"


def print_variant(result: dict[str, Any]) -> None:
    print(f"\n== {result['variant']}: {result['what']}")
    print(f"start {mib(result['start'])}   peak {mib(result['peak'])}   "
          f"end {mib(result['end'])} ({result['after'][-1][0]:.0f} s after the last wave)")
    for index, w in enumerate(result["waves"], 1):
        print(f"  wave {index}: {w['held']} held ({w['failed']} failed), relay files "
              f"+{w['relay_files_held']}, RSS held {mib(w['rss_held'])}, closed "
              f"{mib(w['rss_closed'])}, {w['per_connection'] / KiB:.0f} KiB each, {w['seconds']} s")
    trail = "  ".join(f"{t:.0f}s:{rss / MiB:.0f}" for t, rss in result["after"][::10])
    print(f"  after (s:MiB): {trail}")
    back = result["back_within_target_at"]
    print(f"  back within {TARGET_RETURN // MiB} MiB of the start: "
          + (f"after {back:.0f} s" if back is not None else "no"))
    print(f"  RSS growth per hostile connection held (worst wave): "
          f"{result['per_connection'] / KiB:.1f} KiB")
    trims = result["trims"]
    if trims["logged"]:
        print(f"  relay's trims that gave back >= 8 MiB: {trims['logged']}, "
              f"{trims['released_mib']:.0f} MiB in all, longest {trims['max_ms']:.0f} ms")
    print(f"  relay still answers (401): {'yes' if result['alive_after'] else 'NO'}")
    for target in result["targets"]:
        print(f"  [{'PASS' if target['passed'] else 'MISS'}] {target['name']}")
    sys.stdout.flush()  # one variant takes minutes: show it when it is done


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rendezvous-memory-"))
    try:
        yield path
    finally:
        if keep:
            print(f"work folder kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                        help=f"repeatable (default: {', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{SCALES['quick'].waves} waves of {SCALES['quick'].per_wave}, "
                             f"{SCALES['quick'].after:.0f} s after (the test suite's form)")
    parser.add_argument("--waves", type=int, help="number of waves")
    parser.add_argument("--per-wave", type=int, help="hostile connections held at once")
    parser.add_argument("--after", type=float, help="seconds watched after the last wave")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (relay logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = SCALES["quick" if args.quick else "full"]
    scale = Scale(args.waves or base.waves, args.per_wave or base.per_wave,
                  base.after if args.after is None else args.after)
    if not (1 <= scale.waves <= 20 and 2 <= scale.per_wave <= 8_000 and 0 <= scale.after <= 600):
        print("error: --waves 1-20, --per-wave 2-8000, --after 0-600", file=sys.stderr)
        return 2
    names = args.variant or list(DEFAULT_VARIANTS)
    skipped = [n for n in names if VARIANTS[n].needs_jemalloc and jemalloc_path() is None]
    for name in skipped:
        print(f"skipping {name}: jemalloc is not installed (apt-get install libjemalloc2)")
    print(f"{scale.waves} waves of {scale.per_wave} hostile connections (half bare "
          f"ClientHellos, half unfinished request heads over TLS), then {scale.after:.0f} s")
    results = []
    with workdir(args.keep) as path:
        for name in names:
            if name not in skipped:
                result = run_variant(VARIANTS[name], scale, path)
                print_variant(result)
                results.append(result)
    document = {"scale": vars(scale), "skipped": skipped, "variants": results,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.json:
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    broken = [r["variant"] for r in results
              if not r["alive_after"] or any(w["failed"] for w in r["waves"])]
    if broken:
        print(f"\nbroken runs (failed connections or a dead relay): {', '.join(broken)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
