"""The processes of a bench run: our relay, haproxy, the bench's agents; /proc readings; py-spy.

Every process is started here with its output in the run's work folder and is stopped by its
own id at the end of its phase (never by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bench import wire
from bench.agents import Identity

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
START_TIMEOUT = 20.0  # a relay, haproxy or agent that is not up by then is broken
STOP_TIMEOUT = 15.0  # our relay grants active pairings 10 s at SIGTERM
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A phase could not run (a process died, a peer never got ready)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((wire.HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((wire.HOST, port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {START_TIMEOUT} s:\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return f"({path} unreadable)"


def stop(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; this one process only."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- /proc


@dataclass(frozen=True, slots=True)
class Usage:
    """One reading of a process: CPU seconds used so far, resident memory, open descriptors."""

    cpu: float
    rss_kb: int
    fds: int
    at: float


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``: utime+stime from /proc/PID/stat (10 ms ticks; it includes threads
    that have ended), or the sum of its live threads' schedstat (to the nanosecond) when that
    says more -- a short phase of a single-threaded relay gets nanoseconds, an agent whose
    per-connection threads come and go loses none of theirs."""
    with open(f"/proc/{pid}/stat") as f:
        # Field 2 (comm) may hold spaces: split after its closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    live = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                live += int(f.read().split()[0])  # nanoseconds on CPU
    return max(ticks, live / 1e9)


def usage(pid: int) -> Usage:
    cpu = cpu_seconds(pid)
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Usage(cpu, rss, fds, time.monotonic())


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent running processes (all cores), since boot.

    User, nice and system time only: interrupt and softirq time (which is where loopback TCP
    does much of its work, on behalf of whichever process) is not any process's, so it is left
    out rather than blamed on "other processes".
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2]) / CLOCK_TICKS  # user, nice, system


class Meter:
    """CPU used by some processes, and by the whole machine, between ``__init__`` and ``stop``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: usage(pid).cpu for name, pid in pids.items()}
        self.busy = busy_seconds()
        self.at = time.monotonic()

    def stop(self) -> dict[str, float]:
        """``{name: cpu seconds, ..., "machine": busy seconds, "wall": seconds}``."""
        out = {name: usage(pid).cpu - self.start[name] for name, pid in self.pids.items()}
        out["machine"] = busy_seconds() - self.busy
        out["wall"] = time.monotonic() - self.at
        return out


# ---------------------------------------------------------------------------- agents


class Agent:
    """A ``python -m bench.agents ROLE`` process and the JSON lines it prints."""

    def __init__(self, workdir: Path, name: str, role: str, *args: str) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self._stderr = self.log.open("wb")
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "bench.agents", role, *args],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.last: dict[str, Any] = {}
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                self.last = line
                self.lines.put(line)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
             what: str) -> dict[str, Any]:
        """The first line (from now on, or the latest one) that satisfies ``predicate``."""
        if self.last and predicate(self.last):
            return self.last
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no {what} after {timeout:.0f} s "
                                 f"(last: {self.last}):\n{tail(self.log)}")
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise BenchError(f"{self.name} exited with {self.proc.returncode} before "
                                     f"{what}:\n{tail(self.log)}") from None
                continue
            if line.get("event") == "error":
                raise BenchError(f"{self.name}: {line}")
            if predicate(line):
                return line

    def result(self, timeout: float) -> dict[str, Any]:
        """The closing ``result`` line of a one-shot role."""
        line = self.wait(lambda m: m.get("event") == "result", timeout, "result")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        return line

    def close(self) -> None:
        """Close stdin (the agent exits at once), then make sure it is gone."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            stop(self.proc, 5)
        self._stderr.close()


@contextlib.contextmanager
def agents() -> Iterator[list[Agent]]:
    """A list to put agents in; every one is closed on the way out."""
    started: list[Agent] = []
    try:
        yield started
    finally:
        for agent in reversed(started):
            agent.close()


# ---------------------------------------------------------------------------- our relay


def write_ids(path: Path, ids: list[Identity]) -> str:
    path.write_text(json.dumps([i.record() for i in ids]))
    return str(path)


class Relay:
    """``python -m rendezvous serve`` in a subprocess, with its own data folder and registry."""

    def __init__(self, workdir: Path, name: str, tls: bool, cert: Path, key: Path,
                 extra: list[str]) -> None:
        self.workdir = workdir
        self.data = workdir / f"{name}-data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.registry = f"sqlite:///{self.data / 'r.sqlite3'}"
        self.tls = tls
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self._cert, self._key, self._extra = cert, key, extra
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def _cli(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "rendezvous", *args]

    def add_users(self, uuids: list[str]) -> list[Identity]:
        """``rendezvous users add --json`` for each ID (all at once): the entries as the hidden
        server's provisioning file has them."""
        running = [
            subprocess.Popen(
                self._cli("users", "add", "--json", "--uuid", uuid, "--data-dir", str(self.data),
                          "--registry", self.registry, "--server-host", wire.HOST,
                          "--server-port", str(self.port), "--no-ca"),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for uuid in uuids
        ]
        found = []
        for proc in running:
            out, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise BenchError(f"{proc.args!r} failed: {err.decode(errors='replace')}")
            doc = json.loads(out)
            auth = doc["authParams"]
            found.append(Identity(doc["uuid"], auth["base32"], int(auth["step"]),
                                  int(auth["digits"])))
        return found

    def add_fleet(self, prefix: str, count: int) -> list[Identity]:
        """Many entries at once, through the registry class ``users add`` uses (one CLI process
        per entry would take ~0.3 s each)."""
        import asyncio

        from rendezvous.registry import Entry, new_secret, open_registry

        fleet = [Identity(f"{prefix}-{i}", new_secret(), 30, 6) for i in range(count)]

        async def add_all() -> None:
            registry = open_registry(self.registry)
            try:
                for ident in fleet:
                    await registry.add(Entry(uuid=ident.uuid, base32=ident.base32))
            finally:
                await registry.close()

        asyncio.run(add_all())
        return fleet

    def start(self) -> None:
        args = ["serve", "--host", wire.HOST, "--port", str(self.port),
                "--data-dir", str(self.data), "--registry", self.registry, *self._extra]
        if self.tls:
            args += ["--cert", str(self._cert), "--key", str(self._key)]
        else:
            args += ["--no-tls"]
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(self._cli(*args), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        if self._log_file is not None:
            self._log_file.close()


# ---------------------------------------------------------------------------- haproxy


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None)


def ensure_haproxy() -> str:
    """The haproxy binary, installed from Debian (``apt-get install haproxy``) when missing."""
    found = haproxy_binary()
    if found:
        return found
    print("haproxy is missing: installing Debian's package (apt-get install -y haproxy)",
          file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env, timeout=300)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                    "haproxy"], check=True, env=env, timeout=600, stdout=subprocess.DEVNULL)
    found = haproxy_binary()
    if not found:
        raise BenchError("apt-get installed haproxy but no haproxy binary was found")
    return found


def haproxy_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


# One process may not hold more than 20,000 files here, and haproxy reserves two descriptors per
# connection (client and server side) when it sizes maxconn: 9,980 is the most it will accept.
HAPROXY_MAXCONN = 9_980


class Haproxy:
    """haproxy in TCP mode with a generated config, in the foreground (``-db``).

    Frontends, each on its own port, TLS on both sides or plain on both:
      ``cycles`` to the ``backend`` agent (asyncio, like our hidden agent) -- with TLS, a full
                 handshake on each side per connection (``no-ssl-reuse`` on the server line);
      ``bulk``   to the ``bulk-backend`` agent (threads, like our bulk-hidden agent);
      ``idle``   (TLS) connects to ``cycles``'s backend only once the client sends a byte
                 (``tcp-request inspect-delay``), so an idle client costs haproxy one socket, as a
                 parked connection costs our relay one.
    """

    def __init__(self, workdir: Path, name: str, tls: bool, cert: Path, key: Path,
                 threads: int, cycles_backend: int, bulk_backend: int) -> None:
        self.binary = ensure_haproxy()
        self.workdir = workdir
        self.pem = workdir / "haproxy.pem"
        self.pem.write_text(cert.read_text() + key.read_text())
        self.port_cycles, self.port_bulk, self.port_idle = free_port(), free_port(), free_port()
        self.config = workdir / f"{name}.cfg"
        self.log = workdir / f"{name}.log"
        bind = f" ssl crt {self.pem}" if tls else ""
        server = " ssl verify none no-ssl-reuse" if tls else ""
        self.config.write_text(f"""\
global
    nbthread {threads}
    maxconn {HAPROXY_MAXCONN}
    ssl-server-verify none

defaults
    mode tcp
    timeout connect 10s
    timeout client 10m
    timeout server 10m

frontend cycles
    bind {wire.HOST}:{self.port_cycles}{bind}
    default_backend cycles_out

frontend bulk
    bind {wire.HOST}:{self.port_bulk}{bind}
    default_backend bulk_out

frontend idle
    bind {wire.HOST}:{self.port_idle} ssl crt {self.pem}
    tcp-request inspect-delay 10m
    tcp-request content accept if {{ req.len gt 0 }}
    default_backend cycles_out

backend cycles_out
    server b1 {wire.HOST}:{cycles_backend}{server}

backend bulk_out
    server b2 {wire.HOST}:{bulk_backend}{server}
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> None:
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.config)],
                                     cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        for port in (self.port_cycles, self.port_bulk, self.port_idle):
            wait_for_port(port, self.proc, self.log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        if self._log_file is not None:
            self._log_file.close()


# ---------------------------------------------------------------------------- py-spy


def py_spy() -> str | None:
    """py-spy from the venv (``pip install py-spy``) or PATH."""
    beside = Path(PYTHON).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record --native`` on one process for a while, as collapsed stacks."""

    def __init__(self, pid: int, seconds: float, out: Path, rate: int = 100) -> None:
        binary = py_spy()
        if binary is None:
            raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
        self.out = out
        self.seconds = seconds
        self.rate = rate
        self.log = out.with_suffix(".log")
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
             "--rate", str(rate), "--native", "--format", "raw", "--output", str(out)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # py-spy attaches before the workload starts

    def finish(self) -> Path:
        try:
            self.proc.wait(self.seconds + 30)
        except subprocess.TimeoutExpired:
            stop(self.proc, 5)
        self._log_file.close()
        if not self.out.exists():
            raise BenchError(f"py-spy wrote no profile:\n{tail(self.log)}")
        return self.out
