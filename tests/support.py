"""Helpers for tests that run real processes and servers."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def _ephemeral_low() -> int:
    """The lowest port the kernel picks for outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports free_port() hands out lie below the kernel's ephemeral range: the thousands of outgoing
# connections (and bind-0 listeners) of a test run draw from that range, and one of them took a
# port between free_port() and a node's bind often enough to fail a test now and then.
_PORT_HIGH = _ephemeral_low() - 1
_PORT_LOW = max(1024, _PORT_HIGH - 12000)
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, not handed out before in this process (another
    process could still take it before we do, but no outgoing connection will)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(500):
        port = random.randint(_PORT_LOW, _PORT_HIGH)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:  # the range is crowded: any port
        sock.bind((host, 0))
        found: int = sock.getsockname()[1]
        return found


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``host:port`` accepts connections; raise TimeoutError after ``timeout`` seconds.

    With ``proc``, fail at once if that process exits first (a bad flag, a port already taken).
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            status = proc.returncode
            raise RuntimeError(f"{proc.args!r} exited with status {status} before listening")
        if port_open(host, port):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate ``proc`` and reap it, killing it if it ignores SIGTERM for ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0,
             interval: float = 0.02) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return f"({path} unreadable)"


# Log lines come out in batches (rendezvous/logs.py writes at most one batch per 0.1 s): a test
# that looks for the line of something that has just happened waits this long for it.
LOG_LINE_TIMEOUT = 5.0


def wait_for_text(read: Callable[[], str], needle: str, timeout: float = LOG_LINE_TIMEOUT) -> str:
    """What ``read()`` returns once it holds ``needle`` (a process's log, read again and again
    until then); AssertionError with the last reading after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} within {timeout:g} s in:\n{text}")
        time.sleep(0.02)
