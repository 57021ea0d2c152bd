#!/usr/bin/env python3
"""Soak the relay: thousands of verified pairings with random sizes and faults, under attack.

Starts ``python -m rendezvous serve`` as a subprocess on a loopback port with a fresh data
folder, adds hidden servers with ``rendezvous users add --json``, and then, for ``--duration``
seconds, on one asyncio loop in this process:

* hidden servers keep connections parked (raw TLS, ``CONNECT uuid:ID?response=TOTP``) and answer
  every pairing: they read the upload and check its sha256, and stream back a download whose
  sha256 they announce in the response head, plus the upload's digest as a trailer;
* mobile clients make pairings with random upload and download sizes (0 B to 4 MiB), one in
  five with an injected fault (a reset or an early close of either leg, a stall, a slow reader,
  an unknown ID); every good pairing's bytes are verified both ways by sha256; some clients
  pipeline two requests for two IDs in one write on one connection, and each must be answered
  by its own hidden server;
* attackers from 127.0.0.2-127.0.0.9 guess TOTP codes for the real IDs (and unknown ones),
  guess the visitor password of an entry that has one (pipelining guesses on each connection),
  and hold hundreds of slow or half-open connections (TCP with no handshake, half a ClientHello,
  a handshake and no head, a head one line a second, junk);
* a flood from 127.0.0.10 keeps more bare TCP connections open than the relay's per-address
  cap: those over it must be closed at once, the rest at the handshake deadline; meanwhile
  visitors with the right password keep getting through to the entry that has one.

The load runs in two phases (a third and two thirds of the duration), each ended by a full
stop, so the relay's numbers can be taken quiet before, between and after. Then the relay is
asked to exit (SIGTERM), and a report is printed (text, then JSON; ``--json FILE`` writes the
JSON too): pairings completed, bytes verified, faults and their outcomes, unexpected errors by
kind, attackers' answers (429s) and successes, the relay's open descriptors and RSS at start,
between the phases, at peak and at the end (from /proc/PID; RSS also after malloc_trim, see
RSS_FLOOR), and its log's errors.

Exit status 0 when every good pairing completed with its bytes verified, nothing unexpected
happened, no attacker succeeded, the relay logged no error and exited 0, and its descriptors
and (trimmed) RSS came back to where they started, within a tolerance; 1 otherwise.

Bounded in time (``--duration``, default 120 s; ``--quick`` is about 20 s in all) and in count
(``--max-pairings``), loopback only. Run it from the project's venv:

    .venv/bin/python bench/soak.py --quick
    .venv/bin/python bench/soak.py --duration 120 --json soak-report.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from rendezvous.protocol.totp import current_token
from rendezvous.tls import client_ssl_context

HOST = "127.0.0.1"
ATTACKERS = [f"127.0.0.{n}" for n in range(2, 10)]
HEAD_END = b"\r\n\r\n"
PARKED = b"HTTP/1.1 200\r\n\r\n"
OPAQUE = "a4f316df3e6c55a20ca82389083849ea"
KiB, MiB = 1 << 10, 1 << 20
DATA_POOL = 8 * MiB  # random bytes every payload is cut from
WRITE_CHUNK = 256 * KiB
PAIRING_TIMEOUT = 60.0  # one pairing, fault or not, ends within this
STEP_TIMEOUT = 15.0  # one read or connect within a pairing
LINGER_ZERO = struct.pack("ii", 1, 0)

# The relay's settings for the soak: defaults, but a short head timeout so slow peers churn
# (shorter still in --quick, so its first phase sees several rounds of them).
RELAY_HEAD_TIMEOUT = 5.0
QUICK_HEAD_TIMEOUT = 2.0
RELAY_PAIR_WAIT = 2.0
# The bare-socket flood: its own address, the relay's cap per address, and the TLS handshake's
# deadline (inside the head timeout), so the flood's sockets churn.
FLOOD_SOURCE = "127.0.0.10"
RELAY_MAX_PER_ADDRESS = 256
QUICK_MAX_PER_ADDRESS = 128
FLOOD_OVER_CAP = 64  # sockets each flood round opens beyond the cap
RELAY_HANDSHAKE_TIMEOUT = 3.0
QUICK_HANDSHAKE_TIMEOUT = 1.5
AT_ONCE = 0.5  # seconds: a flood socket closed this soon was refused at accept
# One entry has a visitor password: good pairings to it send it; guessers try others.
VISITOR_PASSWORD = "soak visitor password"
VISITOR_FAILURES_PER_CONNECTION = 3  # the relay's default (--visitor-failures-per-connection)
GUESSES_PER_CONNECTION = 8  # pipelined by each visitor guesser on each connection

# Tolerances for "nothing grew". Descriptors: quiet after each phase against quiet before the
# first; any leaked socket shows. RSS is coarser: glibc keeps the heap of the busiest moment
# (uvloop allocates a 256 KiB TLS buffer per connection; a thousand are open at once here), so
# raw RSS only says how busy the run was. Before each quiet measurement the soak asks the
# relay's allocator to give free memory back (malloc_trim, through the sitecustomize hook
# below) and judges that "trimmed" RSS. What stays is heap fragmentation: 60-240 MiB above the
# start in runs here, set by how many connections were open at once, not by how many came and
# went. A leak grows with the work instead, and the second phase does twice the first's work,
# so a leak would end near three times the first phase's growth: the end may be at most twice
# the first phase's growth above the start (or RSS_FLOOR, when the first phase grew little).
FD_TOLERANCE = 4
RSS_FLOOR = 256 * MiB

# Loaded into the relay process only (PYTHONPATH), before `rendezvous serve` runs: a thread
# that calls glibc's malloc_trim(0) whenever the soak creates the trigger file, then removes
# it. The relay's code is untouched; without glibc the hook does nothing.
TRIM_HOOK = """\
import ctypes, os, threading, time
_trigger = os.environ.get("SOAK_TRIM_TRIGGER")
def _watch():
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    while True:
        time.sleep(0.05)
        if os.path.exists(_trigger):
            trim(0)
            os.unlink(_trigger)
if _trigger:
    threading.Thread(target=_watch, name="soak-malloc-trim", daemon=True).start()
"""

GOOD_FAULTS = ("mobile_stall", "hidden_stall", "slow_reader")  # still complete and verify
BAD_FAULTS = ("mobile_reset", "hidden_reset", "mobile_early_close", "hidden_early_close",
              "not_registered")
SLOW_KINDS = ("tcp_idle", "half_hello", "hello_only", "tls_idle", "slowloris", "junk")


# Settings and results ------------------------------------------------------------------------


@dataclass
class Settings:
    duration: float
    seed: int
    ids: int
    pool: int  # parked connections each hidden server keeps
    workers: int  # concurrent mobile clients
    fault_rate: float
    cross_id_rate: float  # share of clients pipelining requests for two IDs on one connection
    guessers: int
    slow: int  # slow or half-open attacker connections held at once
    max_pairings: int
    guess_pace: float  # seconds between one guesser's attempts
    head_timeout: float  # the relay's --head-timeout
    handshake_timeout: float  # the relay's --handshake-timeout
    max_per_address: int  # the relay's --max-per-address (the flood exceeds it)
    visitor_guessers: int


@dataclass
class Results:
    good_started: int = 0
    good_completed: int = 0
    bytes_verified: int = 0
    faults: Counter[str] = field(default_factory=Counter)  # "kind: outcome"
    unexpected: Counter[str] = field(default_factory=Counter)
    unexpected_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # request sent -> response head
    attack: Counter[str] = field(default_factory=Counter)  # guess answers by status
    attacker_successes: int = 0
    slow: Counter[str] = field(default_factory=Counter)
    slow_lifetimes: list[float] = field(default_factory=list)
    hidden: Counter[str] = field(default_factory=Counter)
    challenges: int = 0
    cross_id: int = 0  # pipelined two-ID connections answered right, both ways verified
    visitor: Counter[str] = field(default_factory=Counter)  # visitor guesses' answers
    flood: Counter[str] = field(default_factory=Counter)
    flood_lifetimes: list[float] = field(default_factory=list)  # of those held to the deadline

    def fail(self, kind: str, detail: str = "") -> None:
        self.unexpected[kind] += 1
        if len(self.unexpected_samples) < 30:
            self.unexpected_samples.append(f"{kind}: {detail}"[:300])


@dataclass(frozen=True)
class HiddenEntry:
    uuid: str
    base32: str
    step: int
    digits: int
    password: str | None = None  # its visitor password, if it has one


# The relay process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Relay:
    """``rendezvous serve`` as a subprocess, and its /proc numbers."""

    def __init__(self, workdir: Path, settings: Settings) -> None:
        self.head_timeout = settings.head_timeout
        self.settings = settings
        self.data_dir = workdir / "data"
        self.log_path = workdir / "relay.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.hook_dir = workdir / "hook"
        self.trim_trigger = workdir / "malloc-trim"

    def start(self) -> None:
        args = [sys.executable, "-m", "rendezvous", "serve", "--host", HOST, "--port",
                str(self.port), "--data-dir", str(self.data_dir), "--log-format", "json",
                "--head-timeout", str(self.head_timeout), "--pair-wait", str(RELAY_PAIR_WAIT),
                "--handshake-timeout", str(self.settings.handshake_timeout),
                "--max-per-address", str(self.settings.max_per_address)]
        self.hook_dir.mkdir(parents=True, exist_ok=True)
        (self.hook_dir / "sitecustomize.py").write_text(TRIM_HOOK)
        env = dict(os.environ, SOAK_TRIM_TRIGGER=str(self.trim_trigger))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.hook_dir),
                                                          env.get("PYTHONPATH")]))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the relay does not listen after 30 s") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
        return 0

    def trimmed_rss(self, timeout: float = 3.0) -> int | None:
        """The RSS after the relay's allocator gave free memory back; None if the hook did not
        answer (no glibc)."""
        self.trim_trigger.touch()
        deadline = time.monotonic() + timeout
        while self.trim_trigger.exists():
            if time.monotonic() > deadline:
                self.trim_trigger.unlink(missing_ok=True)
                return None
            time.sleep(0.02)
        return self.rss()

    def add_entries(self, count: int) -> tuple[list[HiddenEntry], str | None]:
        """``users add --json`` ``count`` times (in parallel), the last with a visitor
        password; the entries and the CA PEM."""
        procs = [subprocess.Popen(
            [sys.executable, "-m", "rendezvous", "users", "add", "--json", "--data-dir",
             str(self.data_dir), "--server-host", HOST, "--server-port", str(self.port),
             "--label", f"soak-{index}",
             *(["--visitor-password", VISITOR_PASSWORD] if index == count - 1 else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for index in range(count)]
        entries: list[HiddenEntry] = []
        ca: str | None = None
        for index, proc in enumerate(procs):
            out, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"users add failed: {err.decode(errors='replace')}")
            document = json.loads(out)
            auth = document["authParams"]
            entries.append(HiddenEntry(document["uuid"], auth["base32"], int(auth["step"]),
                                       int(auth.get("digits", 6)),
                                       VISITOR_PASSWORD if index == count - 1 else None))
            ca = document["server"].get("ca") or ca
        return entries, ca

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, and the exit status (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_code = None
        return self.exit_code

    def log_summary(self, since: int = 0) -> dict[str, Any]:
        """Events by name, rejections by reason, and error lines, from the JSON log."""
        events: Counter[str] = Counter()
        rejections: Counter[str] = Counter()
        repeats = 0  # rejections logged as a count on a summary line, not one line each
        errors: list[str] = []
        with self.log_path.open("rb") as log:
            log.seek(since)
            for raw in log:
                line = raw.decode(errors="replace").rstrip("\n")
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    events[str(record.get("event"))] += 1
                    if record.get("event") == "rejected":
                        rejections[str(record.get("reason"))] += 1
                        repeats += int(record.get("repeats") or 0)
                    if record.get("level") in ("error", "critical") or "exception" in record:
                        errors.append(line[:500])
                elif any(word in line for word in ("Traceback", "Error", "error", "Fatal")):
                    errors.append(line[:500])
        return {"events": dict(events.most_common()), "rejections": dict(rejections.most_common()),
                "rejection_lines": sum(rejections.values()), "rejections_counted": repeats,
                "error_lines": len(errors), "error_samples": errors[:10]}


# Helpers -------------------------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """(first line, lower-cased headers) of a head ending in a blank line."""
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


def status_of(answer: bytes) -> str:
    parts = answer.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1][:3].isdigit():
        return parts[1][:3].decode()
    return "close" if not answer else "garbage"


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    writer.transport.abort()


async def close(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), timeout)


def authorization(uuid: str, rng: random.Random, target: str, password: str | None = None
                  ) -> str:
    if password is not None:  # an entry with a visitor password: the right one
        return "Basic " + base64.b64encode(f"{uuid}:{password}".encode()).decode()
    if rng.random() < 0.5:
        return "Basic " + base64.b64encode(f"{uuid}:{rng.randrange(10**6)}".encode()).decode()
    return (f'Digest username="{uuid}", realm="rendezvous", nonce="{rng.randbytes(16).hex()}", '
            f'uri="{target}", algorithm=MD5, response="{rng.randbytes(16).hex()}", '
            f'opaque="{OPAQUE}", qop=auth, nc=00000001, cnonce="{rng.randbytes(8).hex()}"')


def random_size(rng: random.Random) -> int:
    """0 B to 4 MiB, most of them small, as HTTP traffic is."""
    bucket = rng.random()
    if bucket < 0.35:
        return rng.choice([0, rng.randrange(1, KiB + 1)])
    if bucket < 0.65:
        return int(2 ** rng.uniform(10, 16))
    if bucket < 0.90:
        return int(2 ** rng.uniform(16, 20))
    return int(2 ** rng.uniform(20, 22))


def client_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# The soak ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, settings: Settings, relay: Relay, entries: list[HiddenEntry],
                 ca_pem: str | None) -> None:
        self.settings = settings
        self.relay = relay
        self.entries = entries
        self.context = client_ssl_context(ca_pem)
        self.results = Results()
        self.rng = random.Random(settings.seed)
        self.pool = memoryview(self.rng.randbytes(DATA_POOL))
        self.hello = client_hello()
        self.stopping = False  # no new pairings or attacks
        self.closing = False  # hidden servers: parked connections closing is expected now
        self.tasks: set[asyncio.Task[Any]] = set()
        self.servers: set[asyncio.Task[Any]] = set()
        # Every connection opened and not yet collected: whatever is open at the end is cut.
        self.writers: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()
        self.marks: dict[str, dict[str, int]] = {}  # the relay's quiet numbers
        self.parked: Counter[str] = Counter()
        self.pairings_begun = 0
        self.samples: list[tuple[float, int, int]] = []  # (t, fds, rss) of the relay

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def open(self, source: str | None = None, tls: bool = True
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            HOST, self.relay.port, ssl=self.context if tls else None,
            server_hostname=HOST if tls else None,
            local_addr=(source, 0) if source else None), STEP_TIMEOUT)
        self.writers.add(writer)
        return reader, writer

    def payload(self, rng: random.Random, size: int) -> memoryview:
        start = rng.randrange(0, DATA_POOL - size + 1)
        return self.pool[start:start + size]

    # Hidden servers ------------------------------------------------------------------------

    async def parker(self, entry: HiddenEntry, rng: random.Random) -> None:
        """One parked-connection slot of a hidden server: park, wait for a pairing, hand it to
        a server task, park again; until the soak ends."""
        results = self.results
        while not self.closing:
            try:
                reader, writer = await self.open()
            except (TimeoutError, OSError) as exc:
                results.fail("hidden: cannot connect", repr(exc))
                await asyncio.sleep(0.2)
                continue
            token = current_token(entry.base32, entry.step, entry.digits)
            writer.write(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n"
                         f"Host: soak\r\n\r\n".encode())
            try:
                answer = await asyncio.wait_for(reader.readexactly(len(PARKED)), STEP_TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                partial = getattr(exc, "partial", b"")
                results.fail("hidden: park refused", f"{status_of(partial)} {exc!r}")
                await close(writer)
                await asyncio.sleep(0.5)
                continue
            if answer != PARKED:
                results.fail("hidden: park refused", status_of(answer))
                await close(writer)
                await asyncio.sleep(0.5)
                continue
            results.hidden["parks"] += 1
            self.parked[entry.uuid] += 1
            try:
                head = await reader.readuntil(HEAD_END)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                self.parked[entry.uuid] -= 1
                if not self.closing:
                    results.fail("hidden: parked connection lost", repr(exc))
                await close(writer, 1.0)
                continue
            except asyncio.CancelledError:
                rst(writer)
                raise
            self.parked[entry.uuid] -= 1
            results.hidden["pairings"] += 1
            server = self.spawn(self.serve(reader, writer, head, random.Random(rng.random()),
                                           entry.uuid))
            self.servers.add(server)
            server.add_done_callback(self.servers.discard)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    head: bytes, rng: random.Random, uuid: str) -> None:
        results = self.results
        try:
            line, fields = parse_head(head)
            if "authorization" in fields:
                results.fail("hidden: Authorization forwarded", line)
            parts = line.split(" ")
            if len(parts) == 3 and parts[1].startswith("/visitor-guess"):
                results.attacker_successes += 1
                results.fail("a visitor guess reached the hidden server", line)
                rst(writer)
                return
            if len(parts) != 3 or parts[0] != "POST" or not parts[1].startswith("/soak?"):
                results.fail("hidden: unexpected request", line)
                rst(writer)
                return
            query = {k: v[0] for k, v in parse_qs(urlsplit(parts[1]).query).items()}
            fault = query.get("fault", "none")
            up, down = int(query["up"]), int(query["down"])
            if int(fields.get("content-length", "-1")) != up:
                results.fail("hidden: Content-Length changed", line)
            async with asyncio.timeout(PAIRING_TIMEOUT):
                await self._serve(reader, writer, fault, up, down, fields, rng, uuid)
        except TimeoutError:
            results.fail("hidden: pairing timed out", head[:100].decode("latin-1"))
            rst(writer)
        except Exception as exc:
            results.fail("hidden: error", repr(exc))
            rst(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     fault: str, up: int, down: int, fields: dict[str, str],
                     rng: random.Random, uuid: str) -> None:
        results = self.results
        if fault == "hidden_early_close":
            await close(writer)
            return
        body = self.payload(rng, down)
        down_sha = hashlib.sha256(body).hexdigest()
        if fault == "hidden_stall":
            await asyncio.sleep(rng.uniform(0.5, 2.0))
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {down + 64}\r\n"
                     f"X-Down-Sha256: {down_sha}\r\nX-Hidden-Id: {uuid}\r\n"
                     "Connection: close\r\n\r\n".encode())

        async def send_body() -> None:
            limit = down // 2 if fault == "hidden_reset" else down
            for start in range(0, limit, WRITE_CHUNK):
                writer.write(body[start:min(limit, start + WRITE_CHUNK)])
                await writer.drain()

        sender = asyncio.ensure_future(send_body())
        digest = hashlib.sha256()
        got = 0
        try:
            while got < up:
                data = await asyncio.wait_for(reader.read(min(WRITE_CHUNK, up - got)),
                                              STEP_TIMEOUT)
                if not data:
                    break
                digest.update(data)
                got += len(data)
        except (TimeoutError, OSError) as exc:
            if fault not in ("mobile_reset", "mobile_early_close"):
                results.fail("hidden: upload read failed", f"{fault} {exc!r}")
            sender.cancel()
            rst(writer)
            results.faults[f"{fault}: hidden saw the stream cut"] += 1
            return
        if fault in ("mobile_reset", "mobile_early_close"):
            sender.cancel()
            if got < up:
                results.faults[f"{fault}: hidden saw the stream end early"] += 1
            else:
                results.fail(f"hidden: {fault} not seen", f"got all {up} bytes")
            rst(writer)
            return
        if got < up:
            results.fail("hidden: upload cut short", f"{fault} {got} of {up}")
            sender.cancel()
            rst(writer)
            return
        up_sha = digest.hexdigest()
        if up_sha != fields.get("x-up-sha256"):
            results.fail("hidden: upload corrupted", fault)
        try:
            await sender
        except OSError as exc:
            results.fail("hidden: download write failed", f"{fault} {exc!r}")
            rst(writer)
            return
        if fault == "hidden_reset":
            rst(writer)
            return
        writer.write(up_sha.encode())  # the trailer: what the hidden server received
        await writer.drain()
        await close(writer)

    # Mobile clients ------------------------------------------------------------------------

    async def mobile_worker(self, rng: random.Random) -> None:
        settings = self.settings
        while not self.stopping and self.pairings_begun < settings.max_pairings:
            self.pairings_begun += 1
            if len(self.entries) > 1 and rng.random() < settings.cross_id_rate:
                try:
                    async with asyncio.timeout(PAIRING_TIMEOUT):
                        await self.cross_id_pairing(rng)
                except TimeoutError:
                    self.results.fail("mobile: cross-ID pairing timed out")
                continue
            fault = "none"
            if rng.random() < settings.fault_rate:
                fault = rng.choice(GOOD_FAULTS + BAD_FAULTS)
            try:
                async with asyncio.timeout(PAIRING_TIMEOUT):
                    await self.pairing(rng, fault)
            except TimeoutError:
                self.results.fail("mobile: pairing timed out", fault)

    async def pairing(self, rng: random.Random, fault: str,
                      entry: HiddenEntry | None = None) -> None:
        results = self.results
        entry = entry or rng.choice(self.entries)
        uuid = entry.uuid if fault != "not_registered" else f"unknown-{rng.randrange(10**9)}"
        up, down = random_size(rng), random_size(rng)
        if fault == "mobile_reset":
            up = max(up, 256 * KiB)
        if fault == "hidden_reset":
            down = max(down, 256 * KiB)
        if fault == "mobile_early_close":
            up = max(up, 1)
        if fault == "slow_reader":
            down = min(max(down, 64 * KiB), 512 * KiB)
        good = fault in ("none", *GOOD_FAULTS)
        if good:
            results.good_started += 1
        upload = self.payload(rng, up)
        up_sha = hashlib.sha256(upload).hexdigest()
        target = f"/soak?up={up}&down={down}&fault={fault}&n={self.pairings_begun}"
        head = (f"POST {target} HTTP/1.1\r\nHost: soak\r\nUser-Agent: soak\r\n"
                f"Authorization: {authorization(uuid, rng, target, entry.password)}\r\n"
                f"Content-Length: {up}\r\nX-Up-Sha256: {up_sha}\r\n\r\n").encode()
        try:
            reader, writer = await self.open()
        except (TimeoutError, OSError) as exc:
            results.fail("mobile: cannot connect", repr(exc))
            return
        try:
            if good and rng.random() < 0.2:
                # As curl --digest does: first without credentials, then again on the same
                # connection once the 401 came.
                writer.write(b"GET /soak HTTP/1.1\r\nHost: soak\r\n\r\n")
                challenge = await asyncio.wait_for(reader.readuntil(HEAD_END), STEP_TIMEOUT)
                if not challenge.startswith(b"HTTP/1.1 401 ") or b"Digest" not in challenge:
                    results.fail("mobile: bad challenge", challenge[:80].decode("latin-1"))
                    rst(writer)
                    return
                results.challenges += 1
            await self._pairing(reader, writer, fault, head, upload, up, down, good, rng)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            if good:
                results.fail(f"mobile: good pairing failed ({fault})", repr(exc))
            else:
                results.fail(f"mobile: {fault} went wrong", repr(exc))
            rst(writer)
        finally:
            if not writer.is_closing():
                rst(writer)

    async def cross_id_pairing(self, rng: random.Random) -> None:
        """Two requests for two IDs in one write on one connection (as a pooling client that
        pipelines would send them): each must reach its own hidden server only (its answer
        names it in X-Hidden-Id), in order, with its bytes verified both ways."""
        results = self.results
        plans = []
        data = bytearray()
        for entry in rng.sample(self.entries, 2):
            up, down = min(random_size(rng), 64 * KiB), min(random_size(rng), 256 * KiB)
            upload = self.payload(rng, up)
            target = f"/soak?up={up}&down={down}&fault=none&n={self.pairings_begun}"
            data += (f"POST {target} HTTP/1.1\r\nHost: soak\r\nUser-Agent: soak-pipelined\r\n"
                     f"Authorization: {authorization(entry.uuid, rng, target, entry.password)}"
                     "\r\n"
                     f"Content-Length: {up}\r\n"
                     f"X-Up-Sha256: {hashlib.sha256(upload).hexdigest()}\r\n\r\n").encode()
            data += upload
            plans.append((entry.uuid, up, down, upload))
        results.good_started += len(plans)
        try:
            reader, writer = await self.open()
        except (TimeoutError, OSError) as exc:
            results.fail("mobile: cannot connect", repr(exc))
            return
        try:
            writer.write(bytes(data))
            for uuid, up, down, upload in plans:
                answer = await asyncio.wait_for(reader.readuntil(HEAD_END),
                                                RELAY_PAIR_WAIT + STEP_TIMEOUT)
                line, fields = parse_head(answer)
                if not line.startswith("HTTP/1.1 200 "):
                    raise ValueError(f"answer {line!r}")
                if fields.get("x-hidden-id") != uuid:
                    raise ValueError(f"answered by {fields.get('x-hidden-id')}, not {uuid}")
                body = await asyncio.wait_for(reader.readexactly(down + 64), STEP_TIMEOUT)
                if hashlib.sha256(body[:down]).hexdigest() != fields.get("x-down-sha256"):
                    raise ValueError("download corrupted")
                if body[down:] != hashlib.sha256(upload).hexdigest().encode():
                    raise ValueError("the hidden server got another upload")
                results.good_completed += 1
                results.bytes_verified += up + down
            if await asyncio.wait_for(reader.read(1), STEP_TIMEOUT):
                raise ValueError("bytes after the second answer")
            results.cross_id += 1
            await close(writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            results.fail("mobile: pipelined cross-ID pairing failed", repr(exc))
            rst(writer)

    async def _pairing(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       fault: str, head: bytes, upload: memoryview, up: int, down: int,
                       good: bool, rng: random.Random) -> None:
        results = self.results
        sent_at = time.monotonic()
        writer.write(head)
        if fault == "mobile_early_close":
            await writer.drain()
            await close(writer)
            results.faults[f"{fault}: injected"] += 1
            return
        if fault == "not_registered":
            answer = await asyncio.wait_for(reader.readuntil(HEAD_END),
                                            RELAY_PAIR_WAIT + STEP_TIMEOUT)
            status = status_of(answer)
            if status == "404":
                results.faults[f"{fault}: 404"] += 1
            else:
                results.fail(f"mobile: {fault} answered {status}", answer[:80].decode("latin-1"))
            rst(writer)
            return

        async def send_body() -> None:
            limit = up // 2 if fault == "mobile_reset" else up
            stall_at = limit // 2 if fault == "mobile_stall" else limit
            for start, end in ((0, stall_at), (stall_at, limit)):
                if fault == "mobile_stall" and start == stall_at:
                    await asyncio.sleep(rng.uniform(0.5, 2.0))  # quiet mid-upload
                for offset in range(start, end, WRITE_CHUNK):
                    writer.write(upload[offset:min(end, offset + WRITE_CHUNK)])
                    await writer.drain()

        sender = asyncio.ensure_future(send_body())
        if fault == "mobile_reset":
            await sender
            await asyncio.sleep(0.01)
            rst(writer)
            results.faults[f"{fault}: injected"] += 1
            return
        try:
            answer = await asyncio.wait_for(reader.readuntil(HEAD_END), STEP_TIMEOUT + 3)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            sender.cancel()
            if fault == "hidden_early_close" and not getattr(exc, "partial", b""):
                results.faults[f"{fault}: closed without an answer"] += 1
                return
            raise
        if fault == "none":
            results.latencies.append(time.monotonic() - sent_at)
        line, fields = parse_head(answer)
        if not line.startswith("HTTP/1.1 200 "):
            sender.cancel()
            raise ValueError(f"answer {line!r}")
        length = int(fields["content-length"])
        if length != down + 64:
            raise ValueError(f"Content-Length {length}, expected {down + 64}")
        digest = hashlib.sha256()
        got = 0
        trailer = bytearray()
        while got < length:
            want = min(16 * KiB if fault == "slow_reader" else WRITE_CHUNK, length - got)
            try:
                data = await asyncio.wait_for(reader.read(want), STEP_TIMEOUT)
            except ConnectionError:
                if fault != "hidden_reset":
                    raise
                data = b""
            if not data:
                break
            body_part = data[:max(0, down - got)]
            digest.update(body_part)
            trailer += data[len(body_part):]
            got += len(data)
            if fault == "slow_reader":
                await asyncio.sleep(0.01)
        if fault == "hidden_reset":
            sender.cancel()
            if got < length:
                results.faults[f"{fault}: mobile got a cut answer"] += 1
            else:
                results.fail(f"mobile: {fault} not seen", f"got all {length} bytes")
            return
        if got < length:
            raise ValueError(f"answer cut after {got} of {length} bytes")
        await asyncio.wait_for(sender, STEP_TIMEOUT)
        if digest.hexdigest() != fields.get("x-down-sha256"):
            raise ValueError("download corrupted")
        if bytes(trailer) != hashlib.sha256(upload).hexdigest().encode():
            raise ValueError("the hidden server got another upload")
        # Then the close: the hidden server closed, so the relay closes this leg too.
        extra = await asyncio.wait_for(reader.read(1), STEP_TIMEOUT)
        if extra:
            raise ValueError("bytes after the answer")
        results.good_completed += 1
        results.bytes_verified += up + down
        if fault != "none":
            results.faults[f"{fault}: completed and verified"] += 1
        await close(writer)

    # Attackers -----------------------------------------------------------------------------

    async def guesser(self, source: str, rng: random.Random) -> None:
        """Guess TOTP codes for real IDs (and unknown ones) from one address, all run long."""
        results = self.results
        while not self.stopping:
            real = rng.random() < 0.8
            uuid = rng.choice(self.entries).uuid if real else f"guess-{rng.randrange(10**9)}"
            token = f"{rng.randrange(10**6):06d}"
            try:
                reader, writer = await self.open(source)
            except (TimeoutError, OSError):
                results.attack["connect failed"] += 1
                await asyncio.sleep(self.settings.guess_pace)
                continue
            writer.write(f"CONNECT uuid:{uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
            try:
                answer = await asyncio.wait_for(reader.read(4096), STEP_TIMEOUT)
            except (TimeoutError, OSError):
                answer = b""
            status = status_of(answer)
            results.attack[status] += 1
            results.attack["guesses"] += 1
            if status == "200":
                results.attacker_successes += 1
                results.fail("attacker parked", f"{source} {uuid} {token}")
            rst(writer)
            await asyncio.sleep(self.settings.guess_pace)

    async def visitor_guesser(self, source: str, rng: random.Random) -> None:
        """Guess the visitor password of the entry that has one, pipelining several guesses
        on each connection: the relay must close it after a few and then answer 429."""
        results = self.results
        uuid = next(e.uuid for e in self.entries if e.password is not None)
        while not self.stopping:
            try:
                reader, writer = await self.open(source)
            except (TimeoutError, OSError):
                results.visitor["connect failed"] += 1
                await asyncio.sleep(self.settings.guess_pace)
                continue
            for _ in range(GUESSES_PER_CONNECTION):
                guess = base64.b64encode(f"{uuid}:{rng.randrange(10**9)}".encode()).decode()
                writer.write(f"GET /visitor-guess HTTP/1.1\r\nHost: soak\r\n"
                             f"Authorization: Basic {guess}\r\n\r\n".encode())
            answer = bytearray()
            closed = False
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(STEP_TIMEOUT):
                    while chunk := await reader.read(65536):
                        answer += chunk
                    closed = True
            codes = [code.decode() for code in re.findall(rb"^HTTP/1\.1 (\d{3})", answer,
                                                          re.MULTILINE)]
            results.visitor["guesses"] += len(codes)
            for code in codes:
                results.visitor[code] += 1
                if code not in ("401", "429"):
                    results.attacker_successes += code == "200"
                    results.fail("visitor guess answered", code)
            if closed:
                results.visitor["closed by the relay"] += 1
            if codes.count("401") > VISITOR_FAILURES_PER_CONNECTION:
                results.fail("relay let one connection guess more than "
                             f"{VISITOR_FAILURES_PER_CONNECTION} times", str(codes))
            rst(writer)
            await asyncio.sleep(self.settings.guess_pace)

    async def flooder(self) -> None:
        """Keep more bare TCP connections open from one address than the relay's cap, round
        after round: those over the cap must be closed at once, the rest at the handshake
        deadline, and nobody else may notice."""
        results = self.results
        settings = self.settings
        size = settings.max_per_address + FLOOD_OVER_CAP
        while not self.stopping:
            opened = await asyncio.gather(*(self.open(FLOOD_SOURCE, tls=False)
                                            for _ in range(size)), return_exceptions=True)
            pairs = [found for found in opened if not isinstance(found, BaseException)]
            results.flood["opened"] += len(pairs)
            results.flood["open failed"] += size - len(pairs)
            started = time.monotonic()
            await asyncio.gather(*(self._flood_wait(reader, writer, started)
                                   for reader, writer in pairs))

    async def _flood_wait(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          started: float) -> None:
        results = self.results
        limit = self.settings.handshake_timeout + 5.0
        try:
            async with asyncio.timeout(limit):
                while not self.stopping and await reader.read(65536):
                    pass
        except TimeoutError:
            results.fail("relay held a bare socket past its handshake deadline",
                         f"{limit:.1f} s")
        except OSError:
            pass
        lifetime = time.monotonic() - started
        if self.stopping and lifetime < self.settings.handshake_timeout - AT_ONCE:
            pass  # cut by us at the phase's end
        elif lifetime < AT_ONCE:
            results.flood["closed at once"] += 1
        else:
            results.flood["closed at the handshake deadline"] += 1
            results.flood_lifetimes.append(lifetime)
        rst(writer)

    async def slow_peer(self, slot: int, rng: random.Random) -> None:
        """Hold one slow or half-open connection after another until the soak ends; each must
        be cut by the relay within its head timeout."""
        results = self.results
        source = ATTACKERS[slot % len(ATTACKERS)]
        while not self.stopping:
            kind = rng.choice(SLOW_KINDS)
            opened = time.monotonic()
            try:
                reader, writer = await self.open(source, tls=kind not in (
                    "tcp_idle", "half_hello", "hello_only"))
            except (TimeoutError, OSError) as exc:
                results.slow[f"{kind}: open failed"] += 1
                if "handshake" not in repr(exc).lower():
                    await asyncio.sleep(0.5)
                continue
            results.slow[f"{kind}: opened"] += 1
            try:
                cut = await self._hold(kind, reader, writer, rng)
            except asyncio.CancelledError:
                rst(writer)
                raise
            lifetime = time.monotonic() - opened
            if cut:
                results.slow[f"{kind}: cut by the relay"] += 1
                results.slow_lifetimes.append(lifetime)
                if lifetime > self.settings.head_timeout + 5.0:
                    results.fail("relay held a slow peer past its head timeout",
                                 f"{kind} {lifetime:.1f} s")
            rst(writer)

    async def _hold(self, kind: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, rng: random.Random) -> bool:
        """Do ``kind``'s thing; True once the relay closed the connection, False if the soak
        ended first."""
        if kind == "half_hello":
            writer.write(self.hello[: len(self.hello) // 2])
        elif kind == "hello_only":
            writer.write(self.hello)
        elif kind == "junk":
            writer.write(rng.randbytes(rng.randrange(1, 300)))
        elif kind == "slowloris":
            writer.write(b"GET / HTTP/1.1\r\n")
        deadline = time.monotonic() + self.settings.head_timeout + 10.0
        while not self.stopping and time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                if kind == "slowloris":
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write(b"X-Slow: %d\r\n" % rng.randrange(10**6))
                continue
            except OSError:
                return True
            if not data:
                return True
        return False

    # Running -------------------------------------------------------------------------------

    async def sample(self) -> None:
        started = time.monotonic()
        while True:
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic() - started, self.relay.fds(),
                                     self.relay.rss()))
            await asyncio.sleep(1.0)

    async def relay_numbers(self, settle_to: int | None = None) -> dict[str, int]:
        """The relay's descriptors and RSS once it is quiet: with ``settle_to``, after its
        descriptors came down to that (bounded wait)."""
        if settle_to is not None:
            deadline = time.monotonic() + 15.0
            while self.relay.fds() > settle_to and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        numbers = {"fds": self.relay.fds(), "rss": self.relay.rss()}
        trimmed = await asyncio.to_thread(self.relay.trimmed_rss)
        numbers["trimmed"] = trimmed if trimmed is not None else numbers["rss"]
        return numbers

    async def warm_up(self) -> None:
        """One park, so the relay has opened its registry files before the baseline."""
        entry = self.entries[0]
        reader, writer = await self.open()
        token = current_token(entry.base32, entry.step, entry.digits)
        writer.write(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.readexactly(len(PARKED)), STEP_TIMEOUT)
        if answer != PARKED:
            raise RuntimeError(f"warm-up park refused: {answer!r}")
        await close(writer)

    async def run(self) -> None:
        """Two phases of load (a third, then two thirds of the duration), each ended by a
        full stop; the relay's numbers are taken quiet before, between and after: whatever a
        phase leaves open or allocated shows when nothing should be."""
        sampler = self.spawn(self.sample())
        await self.warm_up()
        self.marks["start"] = await self.relay_numbers()
        settle_to = self.marks["start"]["fds"] + FD_TOLERANCE
        await self.phase(self.settings.duration / 3)
        self.marks["warm"] = await self.relay_numbers(settle_to)
        await self.phase(self.settings.duration * 2 / 3)
        self.marks["end"] = await self.relay_numbers(settle_to)
        sampler.cancel()
        await asyncio.wait([sampler], timeout=5)

    async def phase(self, duration: float) -> None:
        settings = self.settings
        rng = self.rng
        self.stopping = self.closing = False
        self.parked = Counter()
        parkers = [self.spawn(self.parker(entry, random.Random(rng.random())))
                   for entry in self.entries for _ in range(settings.pool)]
        # Hidden servers first, so their addresses are trusted for their IDs before attackers
        # empty the IDs' buckets.
        deadline = time.monotonic() + 20
        while any(self.parked[e.uuid] < settings.pool for e in self.entries):
            if time.monotonic() > deadline:
                raise RuntimeError(f"hidden servers did not park: {dict(self.parked)}")
            await asyncio.sleep(0.05)
        # And a visitor with the password gets in once from its address, as real ones have.
        guarded = next(e for e in self.entries if e.password is not None)
        async with asyncio.timeout(PAIRING_TIMEOUT):
            await self.pairing(random.Random(rng.random()), "none", guarded)
        attackers = [self.spawn(self.guesser(ATTACKERS[i % len(ATTACKERS)],
                                             random.Random(rng.random())))
                     for i in range(settings.guessers)]
        attackers += [self.spawn(self.slow_peer(i, random.Random(rng.random())))
                      for i in range(settings.slow)]
        attackers += [self.spawn(self.visitor_guesser(ATTACKERS[i % len(ATTACKERS)],
                                                      random.Random(rng.random())))
                      for i in range(settings.visitor_guessers)]
        attackers.append(self.spawn(self.flooder()))
        workers = [self.spawn(self.mobile_worker(random.Random(rng.random())))
                   for _ in range(settings.workers)]
        await asyncio.sleep(duration)
        self.stopping = True
        # Let the pairings under way finish (each is bounded by PAIRING_TIMEOUT).
        if workers:
            await asyncio.wait(workers, timeout=PAIRING_TIMEOUT + 5)
        for task in attackers:
            task.cancel()
        if attackers:
            await asyncio.wait(attackers, timeout=10)
        # The servers of the last pairings end on their own; then the parked slots close.
        if self.servers:
            await asyncio.wait(list(self.servers), timeout=PAIRING_TIMEOUT)
        self.closing = True
        for task in parkers:
            task.cancel()
        await asyncio.wait(parkers, timeout=10)
        stuck = [t for t in self.tasks
                 if not t.done() and getattr(t.get_coro(), "__name__", "") != "sample"]
        if stuck:
            self.results.fail("driver tasks still running at the end", str(len(stuck)))
            for task in stuck:
                task.cancel()
        for writer in list(self.writers):  # whatever is still open: cut it
            if not writer.is_closing():
                rst(writer)
        await asyncio.sleep(0.1)


async def soak_main(settings: Settings, relay: Relay, entries: list[HiddenEntry],
                    ca: str | None) -> Soak:
    soak = Soak(settings, relay, entries, ca)
    await soak.run()
    return soak


def run_loop(main: Callable[[], Awaitable[Soak]]) -> Soak:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())  # type: ignore[arg-type]


# Report --------------------------------------------------------------------------------------


def build_report(settings: Settings, soak: Soak, relay: Relay, log: dict[str, Any],
                 elapsed: float) -> dict[str, Any]:
    r = soak.results
    start, warm, end = (soak.marks[name] for name in ("start", "warm", "end"))
    first_growth = max(0, warm["trimmed"] - start["trimmed"])
    rss_allowed = start["trimmed"] + max(RSS_FLOOR, 2 * first_growth)
    peak_fds = max((s[1] for s in soak.samples), default=0)
    peak_rss = max((s[2] for s in soak.samples), default=0)
    expected = dict(sorted(r.faults.items()))
    good_failed = r.good_started - r.good_completed  # failed, or not done when the soak ended
    reasons = []
    if good_failed:
        reasons.append(f"{good_failed} good pairings failed")
    if r.unexpected:
        reasons.append(f"{sum(r.unexpected.values())} unexpected errors")
    if r.attacker_successes:
        reasons.append(f"{r.attacker_successes} attacker successes")
    if r.good_completed == 0:
        reasons.append("no pairing completed")
    if log["error_lines"]:
        reasons.append(f"{log['error_lines']} error lines in the relay's log")
    if relay.exit_code != 0:
        reasons.append(f"the relay exited with {relay.exit_code} on SIGTERM")
    for name, numbers in (("between the phases", warm), ("at the end", end)):
        if numbers["fds"] > start["fds"] + FD_TOLERANCE:
            reasons.append(f"relay descriptors {name}: {numbers['fds']}, {start['fds']} before")
    if end["trimmed"] > rss_allowed:
        reasons.append(f"relay RSS (trimmed) grew with the work: {start['trimmed'] / MiB:.1f} -> "
                       f"{warm['trimmed'] / MiB:.1f} -> {end['trimmed'] / MiB:.1f} MiB "
                       f"(allowed {rss_allowed / MiB:.1f} at the end)")
    slow_cut = sum(v for k, v in r.slow.items() if k.endswith("cut by the relay"))
    return {
        "ok": not reasons,
        "failures": reasons,
        "elapsed_s": round(elapsed, 1),
        "settings": {**vars(settings), "relay_pair_wait": RELAY_PAIR_WAIT,
                     "relay": "defaults otherwise"},
        "pairings": {
            "begun": soak.pairings_begun,
            "good_started": r.good_started,
            "good_completed": r.good_completed,
            "good_failed": good_failed,
            "all_good_verified": good_failed == 0 and r.good_started == r.good_completed,
            "bytes_verified": r.bytes_verified,
            "digest_challenges_first": r.challenges,
            "pipelined_cross_id_verified": r.cross_id,
            "latency_ms": {"p50": round(percentile(r.latencies, 0.5) * 1000, 1),
                           "p99": round(percentile(r.latencies, 0.99) * 1000, 1),
                           "max": round(max(r.latencies, default=0) * 1000, 1)},
        },
        "faults_expected_outcomes": expected,
        "unexpected_errors": dict(r.unexpected.most_common()),
        "unexpected_samples": r.unexpected_samples,
        "hidden": dict(r.hidden),
        "visitor_guessing": {
            "guesses": r.visitor["guesses"],
            "answers": {k: v for k, v in sorted(r.visitor.items()) if k != "guesses"},
            "401s": r.visitor["401"],
            "429s": r.visitor["429"],
            "closed_by_relay": r.visitor["closed by the relay"],
        },
        "flood": {
            "source": FLOOD_SOURCE,
            "relay_max_per_address": settings.max_per_address,
            "opened": r.flood["opened"],
            "open_failed": r.flood["open failed"],
            "closed_at_once": r.flood["closed at once"],
            "closed_at_handshake_deadline": r.flood["closed at the handshake deadline"],
            "longest_s": round(max(r.flood_lifetimes, default=0), 2),
        },
        "attackers": {
            "guesses": r.attack["guesses"],
            "answers": {k: v for k, v in sorted(r.attack.items()) if k != "guesses"},
            "429s": r.attack["429"],
            "successes": r.attacker_successes,
            "slow_connections": dict(sorted(r.slow.items())),
            "slow_held_at_once": settings.slow,
            "slow_cut_by_relay": slow_cut,
            "slow_lifetime_max_s": round(max(r.slow_lifetimes, default=0), 2),
        },
        "relay": {
            "pid": relay.pid,
            "fds": {"start": start["fds"], "between_phases": warm["fds"], "peak": peak_fds,
                    "end": end["fds"], "allowed": start["fds"] + FD_TOLERANCE},
            "rss_mib": {"start": round(start["rss"] / MiB, 1),
                        "between_phases": round(warm["rss"] / MiB, 1),
                        "peak": round(peak_rss / MiB, 1), "end": round(end["rss"] / MiB, 1)},
            "rss_trimmed_mib": {"start": round(start["trimmed"] / MiB, 1),
                                "between_phases": round(warm["trimmed"] / MiB, 1),
                                "end": round(end["trimmed"] / MiB, 1),
                                "allowed": round(rss_allowed / MiB, 1)},
            "exit_code": relay.exit_code,
            "samples_every_5s": [(round(t), fds, round(rss / MiB, 1))
                                 for t, fds, rss in soak.samples[::5]],
            "log": log,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    p, a, rl = report["pairings"], report["attackers"], report["relay"]
    print(f"soak: {'OK' if report['ok'] else 'FAILED'} after {report['elapsed_s']} s")
    for reason in report["failures"]:
        print(f"  failure: {reason}")
    print(f"  good pairings: {p['good_completed']} of {p['good_started']} completed and verified "
          f"({p['bytes_verified'] / MiB:.1f} MiB checked by sha256), "
          f"latency p50 {p['latency_ms']['p50']} ms, p99 {p['latency_ms']['p99']} ms; "
          f"{p['pipelined_cross_id_verified']} connections pipelined two IDs, each answered "
          "by its own hidden server")
    print("  injected faults, expected outcomes:")
    for kind, count in report["faults_expected_outcomes"].items():
        print(f"    {kind}: {count}")
    print(f"  unexpected errors: {sum(report['unexpected_errors'].values())}")
    for kind, count in report["unexpected_errors"].items():
        print(f"    {kind}: {count}")
    print(f"  attackers: {a['guesses']} guesses, answers {a['answers']}, "
          f"successes {a['successes']}; {a['slow_held_at_once']} slow peers at once, "
          f"{a['slow_cut_by_relay']} cut by the relay (longest {a['slow_lifetime_max_s']} s)")
    v, f = report["visitor_guessing"], report["flood"]
    print(f"  visitor guesses: {v['guesses']}, answers {v['answers']}")
    print(f"  bare-socket flood from {f['source']} (cap {f['relay_max_per_address']}): "
          f"{f['opened']} opened, {f['closed_at_once']} closed at once, "
          f"{f['closed_at_handshake_deadline']} at the handshake deadline "
          f"(longest {f['longest_s']} s)")
    print(f"  relay log: {rl['log']['rejection_lines']} rejection lines, "
          f"{rl['log']['rejections_counted']} more rejections counted on them")
    fds, rss, trimmed = rl["fds"], rl["rss_mib"], rl["rss_trimmed_mib"]
    print(f"  relay pid {rl['pid']}: exit {rl['exit_code']}, log errors {rl['log']['error_lines']}")
    print(f"    descriptors: {fds['start']} at start, {fds['between_phases']} between the phases, "
          f"peak {fds['peak']}, {fds['end']} at the end (allowed {fds['allowed']})")
    print(f"    RSS MiB: {rss['start']} at start, {rss['between_phases']} between the phases, "
          f"peak {rss['peak']}, {rss['end']} at the end")
    print(f"    RSS MiB after malloc_trim: {trimmed['start']} at start, "
          f"{trimmed['between_phases']} between the phases, {trimmed['end']} at the end "
          f"(allowed {trimmed['allowed']})")


# Main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds of load (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="the short form for CI: 15 s of load, fewer attackers (~20 s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--workers", type=int, default=None, help="concurrent mobile clients")
    parser.add_argument("--slow", type=int, default=None,
                        help="slow or half-open attacker connections held at once")
    parser.add_argument("--guessers", type=int, default=8, help="token-guessing attackers")
    parser.add_argument("--visitor-guessers", type=int, default=2,
                        help="visitor-password guessing attackers (default: %(default)s)")
    parser.add_argument("--fault-rate", type=float, default=0.2,
                        help="share of pairings with an injected fault (default: %(default)s)")
    parser.add_argument("--cross-id-rate", type=float, default=0.1,
                        help="share of clients pipelining requests for two IDs on one "
                        "connection (default: %(default)s)")
    parser.add_argument("--max-pairings", type=int, default=100_000,
                        help="stop starting pairings after this many (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (relay log)")
    args = parser.parse_args(argv)
    quick = args.quick
    slow = args.slow if args.slow is not None else (200 if quick else 1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    slow = max(0, min(slow, soft - 400))
    settings = Settings(
        duration=15.0 if quick else args.duration,
        seed=args.seed if args.seed is not None else random.randrange(2**32),
        ids=3,
        pool=4,
        workers=args.workers or (8 if quick else 12),
        fault_rate=args.fault_rate,
        cross_id_rate=args.cross_id_rate,
        guessers=args.guessers,
        slow=slow,
        max_pairings=args.max_pairings,
        guess_pace=0.1,
        head_timeout=QUICK_HEAD_TIMEOUT if quick else RELAY_HEAD_TIMEOUT,
        handshake_timeout=QUICK_HANDSHAKE_TIMEOUT if quick else RELAY_HANDSHAKE_TIMEOUT,
        max_per_address=QUICK_MAX_PER_ADDRESS if quick else RELAY_MAX_PER_ADDRESS,
        visitor_guessers=args.visitor_guessers,
    )
    return settings, args


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="rendezvous-soak-"))
    relay = Relay(workdir, settings)
    report: dict[str, Any] | None = None
    try:
        relay.start()
        entries, ca = relay.add_entries(settings.ids)
        log_offset = relay.log_path.stat().st_size
        soak = run_loop(lambda: soak_main(settings, relay, entries, ca))
        relay.stop()
        log = relay.log_summary(log_offset)
        report = build_report(settings, soak, relay, log, time.monotonic() - began)
    finally:
        relay.stop()
        if args.keep:
            print(f"work folder kept: {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
