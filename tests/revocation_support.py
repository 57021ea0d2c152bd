"""Helpers for the revocation tests: the CLI in its own process, parked sockets the relay closes,
visitors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
from harness import ServerThread, recv_exactly
from requests.auth import HTTPDigestAuth

from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry

# The promise: within this long of a rotate or remove, nothing is parked under the old secret.
REVOKED_WITHIN = 2.0
POLL = 0.2  # the relay's registry poll in these tests (the default is 0.5)


def users(registry_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``rendezvous users ARGS`` in a process of its own, on the relay's registry."""
    proc = subprocess.run(
        [sys.executable, "-m", "rendezvous", "users", *args, "--registry", registry_url,
         "--data-dir", str(tmp_path / "cli")],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")})
    assert proc.returncode == 0, proc.stderr
    return proc


def closed_by_relay(sock: socket.socket, timeout: float) -> bool:
    """Whether the relay closes ``sock`` (parked, so it sends nothing else) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset, or TLS ended without close_notify: closed all the same


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition()`` holds; fail after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def visit(server: ServerThread, entry: Entry, password: str = "x",
          path: str = "/") -> requests.Response:
    """One visitor, the way ``curl --digest -u ID:password`` is one."""
    assert server.tls is not None
    return requests.get(server.url() + path, auth=HTTPDigestAuth(entry.uuid, password),
                        verify=str(server.tls.cert_file), timeout=10)


def connect_status(server: ServerThread, entry: Entry) -> bytes:
    """The status line a CONNECT with ``entry``'s current token gets."""
    with server.connect() as sock:
        token = current_token(entry.base32, entry.step, entry.digits)
        sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        return recv_exactly(sock, 12)


def parked_entries(server: ServerThread, uuid: str) -> list[Entry | None]:
    """The entry each parked connection of ``uuid`` would pair with."""
    hub = server.server.hub
    assert hub is not None
    return server.sync(lambda: [c.entry for c in hub.parked(uuid)])  # type: ignore[no-any-return]
