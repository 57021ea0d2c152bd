"""Helpers for the hidden-agent tests: a provisioning file for a harness relay, a local HTTP
service in a thread (the thing the agent forwards to), and the agent as a real process.

(A module of its own rather than a conftest.py: ``tests/conftest.py`` already owns the name
``conftest`` on the import path.)"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness import ServerThread

from rendezvous.protocol.proxy import V2_SIGNATURE
from rendezvous.provisioning import provisioning_document, write_provisioning
from rendezvous.registry import Entry

# A cold interpreter start (uvloop, the agent) on a loaded 2-core machine.
START_TIMEOUT = 20.0
BIG = 50 << 20  # bytes of the bulk transfers


@functools.cache
def payload(size: int = BIG) -> bytes:
    """Deterministic bytes for downloads (built once per size)."""
    return random.Random(size).randbytes(size)


def write_provisioning_for(server: ServerThread, entry: Entry, path: Path,
                           base32: str | None = None) -> Path:
    """The §5 file for ``entry`` on the harness relay (127.0.0.1, its port, its certificate);
    ``base32`` puts another secret in it."""
    assert server.tls is not None
    doc = provisioning_document(entry, "127.0.0.1", server.port,
                                server.tls.cert_file.read_text())
    if base32 is not None:
        doc["authParams"]["base32"] = base32
    write_provisioning(doc, path)
    return path


def total_parks(server: ServerThread) -> int:
    """How many CONNECTs the relay has parked since it started."""
    def count() -> int:
        assert server.server.hub is not None
        return server.server.hub.stats.parked
    return int(server.sync(count))


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait on the running loop (its agent goes on meanwhile) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# The local service ----------------------------------------------------------------------------


class _LocalHandler(BaseHTTPRequestHandler):
    """``GET /hello``: JSON of the request; ``GET /sleep/S``: the same after S seconds;
    ``GET /download/N``: N bytes of :func:`payload`; ``POST /upload``: length and sha256."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection does not hold its thread for ever
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, document: Any) -> None:
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _describe(self) -> dict[str, Any]:
        return {"method": self.command, "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()]}

    def do_GET(self) -> None:
        self.server.service.requests += 1
        sleep = re.fullmatch(r"/sleep/([\d.]+)", self.path)
        download = re.fullmatch(r"/download/(\d+)", self.path)
        if sleep:
            self.server.service.sleeping.set()
            time.sleep(float(sleep.group(1)))
            self._json(self._describe())
        elif download:
            data = memoryview(payload(int(download.group(1))))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for start in range(0, len(data), 1 << 20):
                self.wfile.write(data[start:start + (1 << 20)])
        else:
            self._json(self._describe())

    def do_POST(self) -> None:
        self.server.service.requests += 1
        left = int(self.headers.get("Content-Length") or 0)
        digest = hashlib.sha256()
        length = 0
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("body cut short")
            digest.update(chunk)
            length += len(chunk)
            left -= len(chunk)
        self._json({"length": length, "sha256": digest.hexdigest()})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: LocalHTTP


class LocalHTTP:
    """A stdlib HTTP server on 127.0.0.1 in a thread; ``stop()`` and ``start()`` again on the
    same port (a local service going away and coming back)."""

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0
        self.sleeping = threading.Event()  # a /sleep request has begun
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _LocalHandler)
        server.service = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(5)
        self._server = self._thread = None


class ProxyHeaderService:
    """A local service that expects a PROXY header (v1 or v2) before HTTP, on 127.0.0.1 in a
    thread: it answers JSON of the header it got (``header``, hex) and the request line, and
    closes. ``close()`` stops it."""

    def __init__(self) -> None:
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ProxyHeaderHandler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _ProxyHeaderHandler(socketserver.StreamRequestHandler):
    timeout = 30

    def handle(self) -> None:
        first = self.rfile.read(12)
        if first == V2_SIGNATURE:
            rest = self.rfile.read(4)
            header = first + rest + self.rfile.read(int.from_bytes(rest[2:4], "big"))
        else:
            header = first + self.rfile.readline()
        request_line = self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # the rest of the head
        answer = json.dumps({"header": header.hex(),
                             "request": request_line.rstrip(b"\r\n").decode()}).encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(answer), answer))


def proxy_source(header: bytes) -> tuple[str, str, int, int]:
    """(source address, destination address, source port, destination port) that a PROXY
    header of version 1 or 2 (TCP over IPv4) names; AssertionError for anything else."""
    if header[:12] == V2_SIGNATURE:
        assert header[12:14] == b"\x21\x11", header  # PROXY command, TCP over IPv4
        return (socket.inet_ntoa(header[16:20]), socket.inet_ntoa(header[20:24]),
                int.from_bytes(header[24:26], "big"), int.from_bytes(header[26:28], "big"))
    match = re.fullmatch(rb"PROXY TCP4 ([\d.]+) ([\d.]+) (\d+) (\d+)\r\n", header)
    assert match, header
    return (match.group(1).decode(), match.group(2).decode(), int(match.group(3)),
            int(match.group(4)))


# The agent as a process -----------------------------------------------------------------------


class AgentProcess:
    """``python -m rendezvous hidden ...``, its stderr in a file."""

    def __init__(self, log: Path, args: list[str]) -> None:
        self.log = log
        with log.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rendezvous", "hidden", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} in the agent's log:\n{self.text()}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit status (killing it if it ignores the signal)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"agent ignored SIGTERM for {timeout} s:\n{self.text()}") \
                from None

