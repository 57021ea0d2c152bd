"""Local pairing versus a pairing forwarded between two relay nodes, side by side.

    .venv/bin/python -m bench.cluster [--cycles 300] [--mebibytes 256] [--quick]

Starts a real redis-server and two `rendezvous serve --cluster` nodes (A and B) on loopback;
a hidden server keeps connections parked on A. Mobile clients then connect to A (a local
pairing) and to B (B forwards to A over the internal mutual-TLS listener), measuring the
mobile side's full cycle latency (TLS handshake, request, response, close) and the throughput of
one pairing. Every loop is bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry, new_secret
from rendezvous.tls import generate_self_signed

CLUSTER_KEY = "bench-cluster-key-0123456789"
PARKED = b"HTTP/1.1 200\r\n\r\n"
DEADLINE = 300.0  # seconds: the whole run stops by then, whatever the counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port}")


class Hidden(threading.Thread):
    """Keeps ``pool`` connections parked on one node; answers each pairing's request."""

    def __init__(self, port: int, entry: Entry, context: ssl.SSLContext, pool: int) -> None:
        super().__init__(daemon=True)
        self.port, self.entry, self.context, self.pool = port, entry, context, pool
        self.stop = threading.Event()

    def park(self) -> ssl.SSLSocket:
        sock = self.context.wrap_socket(socket.create_connection(("127.0.0.1", self.port)),
                                        server_hostname="127.0.0.1")
        token = current_token(self.entry.base32, self.entry.step, self.entry.digits)
        sock.sendall(f"CONNECT uuid:{self.entry.uuid}?response={token} HTTP/1.1\r\n\r\n"
                     .encode())
        answer = b""
        while len(answer) < len(PARKED):
            answer += sock.recv(len(PARKED) - len(answer))
        assert answer == PARKED, answer
        return sock

    def serve(self, sock: ssl.SSLSocket, head: bytes) -> None:
        with sock:
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                head += chunk
            path = head.split(b" ", 2)[1].decode()
            size = int(path.rsplit("/", 1)[1]) if path.startswith("/bulk/") else 2
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % size)
            block = b"x" * min(size, 1 << 20)
            sent = 0
            while sent < size:
                piece = block[: size - sent]
                sock.sendall(piece)
                sent += len(piece)

    def run(self) -> None:
        slots = threading.Semaphore(self.pool)
        while not self.stop.is_set():
            if not slots.acquire(timeout=0.1):
                continue
            try:
                sock = self.park()
            except OSError:
                slots.release()
                time.sleep(0.1)
                continue

            def pairing(sock: ssl.SSLSocket = sock) -> None:
                sock.settimeout(None)
                try:
                    first = sock.recv(65536)  # paired when the request arrives
                except OSError:
                    first = b""
                slots.release()  # park a replacement at once
                if first:
                    self.serve(sock, first)
                else:
                    sock.close()

            threading.Thread(target=pairing, daemon=True).start()


def request(port: int, context: ssl.SSLContext, uuid: str, path: str) -> int:
    """One full mobile cycle; returns the body bytes received."""
    auth = base64.b64encode(f"{uuid}:x".encode()).decode()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                             server_hostname="127.0.0.1") as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Basic {auth}\r\n\r\n"
                     .encode())
        received = 0
        head = b""
        buffer = bytearray(1 << 20)
        while True:
            count = sock.recv_into(buffer)
            if not count:
                break
            if not head:
                head = bytes(buffer[:count])
                received += count - (head.index(b"\r\n\r\n") + 4)
                assert head.startswith(b"HTTP/1.1 200"), head[:100]
            else:
                received += count
        return received


def measure(port: int, context: ssl.SSLContext, uuid: str, cycles: int, mib: int,
            deadline: float) -> dict[str, float]:
    latencies = []
    for _ in range(cycles):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        request(port, context, uuid, "/small")
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    size = mib << 20
    started = time.perf_counter()
    assert request(port, context, uuid, f"/bulk/{size}") == size
    seconds = time.perf_counter() - started
    return {
        "cycles": len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "cycles_per_s": len(latencies) / sum(latencies),
        "bulk_mb_per_s": size / seconds / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=300, help="sequential cycles per path")
    parser.add_argument("--mebibytes", type=int, default=256, help="bulk transfer size")
    parser.add_argument("--quick", action="store_true", help="small counts (CI)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.cycles, args.mebibytes = 30, 16
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is needed: apt-get install redis-server")
    deadline = time.monotonic() + DEADLINE
    work = Path(tempfile.mkdtemp(prefix="rendezvous-cluster-bench-"))
    cert, key = work / "cert.pem", work / "key.pem"
    generate_self_signed(["127.0.0.1", "localhost"], cert, key)
    context = ssl.create_default_context(cafile=str(cert))
    redis_port = free_port()
    procs = [subprocess.Popen([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)]
    try:
        wait_port(redis_port)
        registry_url = f"redis://127.0.0.1:{redis_port}/0"
        entry = Entry(uuid="bench-cluster", base32=new_secret())
        client = redis.Redis.from_url(registry_url)
        client.set(entry.uuid, json.dumps(entry.to_record()))
        client.close()
        ports = {}
        for name in "AB":
            ports[name] = port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port",
                 str(port), "--cert", str(cert), "--key", str(key), "--registry", registry_url,
                 "--cluster", f"redis://127.0.0.1:{redis_port}/1", "--node-id", name,
                 "--internal", f"127.0.0.1:{free_port()}", "--settle", "0",
                 "--log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "RENDEZVOUS_CLUSTER_KEY": CLUSTER_KEY}))
            wait_port(port)
        hidden = Hidden(ports["A"], entry, context, pool=4)
        hidden.start()
        time.sleep(0.5)
        results = {
            "local (client on A)": measure(ports["A"], context, entry.uuid, args.cycles,
                                           args.mebibytes, deadline),
            "forwarded (client on B)": measure(ports["B"], context, entry.uuid, args.cycles,
                                               args.mebibytes, deadline),
        }
        hidden.stop.set()
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    local, forwarded = results.values()
    print(f"{'':26}{'p50 ms':>9}{'p99 ms':>9}{'cycles/s':>10}{'MB/s':>9}")
    for name, figures in results.items():
        print(f"{name:26}{figures['p50_ms']:9.2f}{figures['p99_ms']:9.2f}"
              f"{figures['cycles_per_s']:10.1f}{figures['bulk_mb_per_s']:9.0f}")
    print(f"{'forwarded / local':26}{forwarded['p50_ms'] / local['p50_ms']:9.2f}"
          f"{forwarded['p99_ms'] / local['p99_ms']:9.2f}"
          f"{forwarded['cycles_per_s'] / local['cycles_per_s']:10.2f}"
          f"{forwarded['bulk_mb_per_s'] / local['bulk_mb_per_s']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
