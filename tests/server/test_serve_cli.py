"""`rendezvous serve` as a user runs it: a real process, its data folder, the registrar CLI
changing entries while it runs, and curl reaching a hidden server parked from a provisioning
file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import PARKED, recv_all, recv_exactly, recv_until
from support import free_port, stop_process, tail, wait_for_port, wait_for_text

from rendezvous.protocol.totp import current_token
from rendezvous.provisioning import Provisioning, load_provisioning
from rendezvous.tls import client_ssl_context


def rendezvous(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rendezvous", *args], capture_output=True,
                          text=True, timeout=30, check=False, **kwargs)  # type: ignore[call-overload]


@dataclass
class Relay:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path

    def add(self, *extra: str) -> Provisioning:
        out = self.data_dir / f"p{free_port()}.json"
        result = rendezvous("users", "add", "--data-dir", str(self.data_dir), "--server-host",
                            "127.0.0.1", "--server-port", str(self.port), "--out", str(out),
                            *extra)
        assert result.returncode == 0, result.stderr
        return load_provisioning(out)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--data-dir", str(data_dir), "--pair-wait", "0.5", "--log-format",
             "json"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 20, proc)
        yield Relay(proc, port, data_dir, log)
    finally:
        stop_process(proc)


def park(provisioning: Provisioning, port: int, token: str | None = None) -> ssl.SSLSocket:
    context = client_ssl_context(provisioning.ca_pem)
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                               server_hostname="127.0.0.1")
    token = token or current_token(provisioning.base32, provisioning.step, provisioning.digits)
    sock.sendall(f"CONNECT uuid:{provisioning.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
    return sock


def test_first_start_creates_the_data_folder_and_says_what_to_do(relay: Relay) -> None:
    assert (relay.data_dir / "cert.pem").exists() and (relay.data_dir / "key.pem").exists()
    assert (relay.data_dir / "key.pem").stat().st_mode & 0o077 == 0
    output = relay.log.read_text()
    assert "users add" in output
    listening = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert listening[0]["event"] == "listening"
    assert f"127.0.0.1:{relay.port}" in listening[0]["addresses"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_digest_reaches_a_hidden_server_parked_from_its_provisioning_file(
        relay: Relay) -> None:
    provisioning = relay.add("--label", "hub")
    hidden = park(provisioning, relay.port)
    assert recv_exactly(hidden, len(PARKED)) == PARKED

    def serve_one() -> None:
        request = recv_until(hidden, b"\r\n\r\n")
        assert b"Authorization" not in request
        hidden.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\n"
                       b"hello\n")
        hidden.close()

    server_thread = threading.Thread(target=serve_one)
    server_thread.start()
    result = subprocess.run(
        ["curl", "-sS", "--digest", "-u", f"{provisioning.uuid}:x", "--cacert",
         str(relay.data_dir / "cert.pem"), f"https://127.0.0.1:{relay.port}/"],
        capture_output=True, text=True, timeout=20, check=False)
    server_thread.join(5)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"
    text = wait_for_text(relay.log.read_text, '"event": "paired"')
    events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
    assert "parked" in events and "paired" in events


def test_registry_changes_take_effect_without_restart(relay: Relay) -> None:
    provisioning = relay.add()
    old_token = current_token(provisioning.base32, provisioning.step, provisioning.digits)
    rotated = rendezvous("users", "rotate", provisioning.uuid, "--data-dir", str(relay.data_dir),
                         "--out", str(relay.data_dir / "rotated.json"))
    assert rotated.returncode == 0, rotated.stderr
    with park(provisioning, relay.port, old_token) as sock:
        assert recv_all(sock).startswith(b"HTTP/1.1 401\r\n\r\n")
    new = load_provisioning(relay.data_dir / "rotated.json")
    with park(new, relay.port) as sock:
        assert recv_exactly(sock, len(PARKED)) == PARKED
    removed = rendezvous("users", "remove", provisioning.uuid, "--data-dir", str(relay.data_dir))
    assert removed.returncode == 0, removed.stderr
    with park(new, relay.port) as sock:
        assert recv_all(sock).startswith(b"HTTP/1.1 401\r\n\r\n")


def test_sigterm_exits_cleanly(relay: Relay) -> None:
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(15) == 0, tail(relay.log)
    assert '"event": "stopped"' in relay.log.read_text()


def test_port_in_use_is_a_clear_error(tmp_path: Path, relay: Relay) -> None:
    result = rendezvous("serve", "--host", "127.0.0.1", "--port", str(relay.port), "--data-dir",
                        str(tmp_path / "other"), env={**os.environ})
    assert result.returncode == 2
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_sighup_reloads_the_certificate_without_dropping_parked_connections(
        relay: Relay) -> None:
    provisioning = relay.add()
    hidden = park(provisioning, relay.port)
    assert recv_exactly(hidden, len(PARKED)) == PARKED
    old_cert = (relay.data_dir / "cert.pem").read_text()
    made = rendezvous("cert", "--host", "127.0.0.1", "--host", "renewed.example", "--out-dir",
                      str(relay.data_dir), "--force")
    assert made.returncode == 0, made.stderr
    new_cert = (relay.data_dir / "cert.pem").read_text()
    assert new_cert != old_cert
    relay.proc.send_signal(signal.SIGHUP)
    deadline = 50
    while "reloaded" not in relay.log.read_text() and deadline:
        deadline -= 1
        threading.Event().wait(0.1)
    served = ssl.get_server_certificate(("127.0.0.1", relay.port))
    assert served.strip() == new_cert.strip()
    hidden.settimeout(0.3)
    with pytest.raises(TimeoutError):
        hidden.recv(1)  # still parked, nothing dropped
    hidden.close()
    assert relay.proc.poll() is None


def test_acme_http_listener_from_the_command_line(tmp_path: Path) -> None:
    """serve --acme-http PORT (without --acme: redirects only) and its settings; --no-tls
    with it is refused."""
    refused = rendezvous("serve", "--data-dir", str(tmp_path / "x"), "--no-tls",
                         "--acme-http", "0")
    assert refused.returncode != 0 and "--acme-http" in refused.stderr
    port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--data-dir", str(tmp_path / "data"), "--public-host", "relay.test",
             "--server-port", "443", "--acme-http", str(http_port), "--acme-http-timeout",
             "0.3"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", http_port, 20, proc)
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as sock:
            sock.sendall(b"GET /x?y HTTP/1.1\r\nHost: evil.example\r\n\r\n")
            answer = recv_all(sock)
        assert answer.startswith(b"HTTP/1.1 308 ")
        assert b"\r\nLocation: https://relay.test/x?y\r\n" in answer  # (--server-port 443)
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # and nothing more: --acme-http-timeout
            assert recv_all(sock).startswith(b"HTTP/1.1 408 ")
    finally:
        stop_process(proc)
    assert b"listening for plain HTTP" in log.read_bytes()
