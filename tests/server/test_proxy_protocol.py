"""Real client addresses behind a balancer: a real haproxy (``send-proxy``, ``send-proxy-v2``)
in front of the relay, clients reaching it from distinct 127.x addresses; limits, counts and
rejections keyed by the real address; PROXY headers from untrusted sources refused;
``--forwarded`` seen by the hidden server."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import HiddenHTTPService, ServerThread, make_certificate, recv_all, recv_until
from support import free_port, stop_process, tail, wait_for_port

from rendezvous.config import GuessLimits, Limits, ServerConfig, parse_networks
from rendezvous.protocol import responses
from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry

BALANCER = "127.0.0.9"  # haproxy's source address towards the relay: the one trusted
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(),
                                reason="haproxy is not installed (scripts/test installs it)")


@dataclass
class Balanced:
    server: ServerThread
    ports: dict[str, int]  # "v1"/"v2": haproxy's frontend port sending that version

    def connect(self, version: str, source: str) -> socket.socket:
        """A TLS connection to the relay through haproxy, from ``source``."""
        raw = socket.create_connection(("127.0.0.1", self.ports[version]), timeout=5,
                                       source_address=(source, 0))
        return self.server.client_context().wrap_socket(raw, server_hostname="127.0.0.1")


@contextlib.contextmanager
def haproxy(tmp_path: Path, relay_port: int) -> Iterator[dict[str, int]]:
    ports = {"v1": free_port(), "v2": free_port()}
    sections = []
    for version, option in (("v1", "send-proxy"), ("v2", "send-proxy-v2")):
        sections.append(
            f"frontend f{version}\n  bind 127.0.0.1:{ports[version]}\n"
            f"  default_backend b{version}\n"
            f"backend b{version}\n  source {BALANCER}\n"
            f"  server relay 127.0.0.1:{relay_port} {option}\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n  maxconn 200\n"
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n"
        "  timeout server 10s\n" + "".join(sections))
    log = tmp_path / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for port in ports.values():
            wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
        yield ports
    finally:
        stop_process(proc)
        if proc.returncode not in (0, -15, 143):
            print(tail(log))


def relay_config(tmp_path: Path, tls: bool = True, forwarded: bool = False,
                 **limits: object) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1", port=0, tls=make_certificate(tmp_path) if tls else None,
        registry_url="memory://", limits=Limits(**limits),  # type: ignore[arg-type]
        proxy_protocol_from=parse_networks(f"{BALANCER}/32,10.0.0.0/8"), forwarded=forwarded)


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[Balanced]:
    guesses = GuessLimits(per_address_burst=3, per_address_interval=60.0, per_id_burst=100)
    server = ServerThread(relay_config(tmp_path, guesses=guesses, max_per_address=2,
                                       head_timeout=3.0))
    try:
        with haproxy(tmp_path, server.port) as ports:
            yield Balanced(server, ports)
    finally:
        server.stop()


def connect_answer(sock: socket.socket, entry: Entry, token: str) -> bytes:
    with sock:
        sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        return recv_all(sock)


def wrong(entry: Entry) -> str:
    good = current_token(entry.base32, entry.step, entry.digits)
    return f"{(int(good) + 500_000) % 10**6:06d}"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_guesser_behind_the_balancer_is_limited_another_visitor_is_not(
        balanced: Balanced, version: str) -> None:
    server = balanced.server
    entry = server.add_entry()
    for _ in range(3):
        answer = connect_answer(balanced.connect(version, "127.0.0.5"), entry, wrong(entry))
        assert answer.startswith(b"HTTP/1.1 401\r\n"), answer
    answer = connect_answer(balanced.connect(version, "127.0.0.5"), entry, wrong(entry))
    assert answer.startswith(b"HTTP/1.1 429\r\n"), answer
    hub = server.server.hub
    assert hub is not None
    rejected = server.sync(list, hub.stats.recent_rejections)
    # (haproxy's own readiness probes show as handshake failures, from 127.0.0.1)
    guesses = [r for r in rejected if r.uuid == entry.uuid]
    assert [r.status for r in guesses] == [401, 401, 401, 429]
    assert {r.peer.partition(":")[0] for r in guesses} == {"127.0.0.5"}  # the real client
    # Another visitor behind the same balancer still has its own bucket, and can park.
    answer = connect_answer(balanced.connect(version, "127.0.0.6"), entry, wrong(entry))
    assert answer.startswith(b"HTTP/1.1 401\r\n"), answer
    sock = balanced.connect(version, "127.0.0.6")
    token = current_token(entry.base32, entry.step, entry.digits)
    sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
    with sock:
        assert recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        # The relay counts the real client, not the balancer.
        assert server.sync(hub.from_address, "127.0.0.6") == 1
        assert server.sync(hub.from_address, BALANCER) == 0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_per_address_cap_applies_to_the_real_client(balanced: Balanced,
                                                        version: str) -> None:
    held = [balanced.connect(version, "127.0.0.7") for _ in range(2)]
    try:
        third = balanced.connect  # the cap (2) is reached: a third is cut before TLS
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            third(version, "127.0.0.7").sendall(b"GET / HTTP/1.1\r\n\r\n")
        # Others behind the balancer are not capped with it: more than 2 from it in all.
        others = [balanced.connect(version, f"127.0.0.{n}") for n in (11, 12)]
        for sock in others:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 401")
            sock.close()
    finally:
        for sock in held:
            sock.close()


def test_a_proxy_header_from_an_untrusted_source_is_refused(tmp_path: Path) -> None:
    header = b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 443\r\n"
    for tls in (False, True):
        server = ServerThread(relay_config(tmp_path, tls=tls))
        try:
            hub = server.server.hub
            assert hub is not None
            for data in (header, b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12)):
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                    sock.sendall(data)
                    answer = recv_all(sock)
                assert answer == (b"" if tls else responses.status_only(400)), answer
            rejected = server.sync(list, hub.stats.recent_rejections)
            assert [r.reason for r in rejected] == ["PROXY header from an untrusted address"] * 2
            assert all(r.peer.startswith("127.0.0.1:") for r in rejected)
            # The relay keeps serving everyone else.
            with server.connect() as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 401")
        finally:
            server.stop()


def test_a_trusted_source_without_a_valid_header_is_refused(tmp_path: Path) -> None:
    server = ServerThread(relay_config(tmp_path, tls=False, head_timeout=1.0))
    try:
        for data in (b"GET / HTTP/1.1\r\n\r\n", b"PROXY TCP4 1.2.3.4\r\n"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                          source_address=(BALANCER, 0)) as sock:
                sock.sendall(data)
                assert recv_all(sock) == responses.status_only(400)
        # One that never finishes its header is cut at the head timeout.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                      source_address=(BALANCER, 0)) as sock:
            sock.sendall(b"PROXY TCP4 1.2.3.4 ")
            assert recv_all(sock) == b""
        # A plain-TCP relay behind a balancer: the header, then HTTP.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                      source_address=(BALANCER, 0)) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 401")
    finally:
        server.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_forwarded_names_the_real_visitor_to_the_hidden_server(tmp_path: Path,
                                                               version: str) -> None:
    server = ServerThread(relay_config(tmp_path, forwarded=True))
    try:
        entry = server.add_entry()
        assert server.tls is not None
        with haproxy(tmp_path, server.port) as ports, HiddenHTTPService(server, entry) as hidden:
            url = f"https://127.0.0.1:{ports[version]}"
            # Two requests on one curl connection: every head passed on gets its own header.
            subprocess.run(
                ["curl", "-sS", "--max-time", "10", "--digest", "-u", f"{entry.uuid}:x",
                 "--cacert", str(server.tls.cert_file), "--interface", "127.0.0.13",
                 f"{url}/a", f"{url}/b"],
                capture_output=True, timeout=20, check=True)
        assert [r.path for r in hidden.requests] == ["/a", "/b"]
        for request in hidden.requests:
            forwarded = [v for k, v in request.headers if k.lower() == "forwarded"]
            assert forwarded == ["for=127.0.0.13;proto=https"], request
    finally:
        server.stop()


def test_forwarded_is_off_by_default(tmp_path: Path) -> None:
    server = ServerThread(relay_config(tmp_path))
    try:
        entry = server.add_entry()
        assert server.tls is not None
        with HiddenHTTPService(server, entry) as hidden:
            subprocess.run(
                ["curl", "-sS", "--max-time", "10", "--digest", "-u", f"{entry.uuid}:x",
                 "--cacert", str(server.tls.cert_file), f"https://127.0.0.1:{server.port}/"],
                capture_output=True, timeout=20, check=True)
        assert hidden.requests and all(r.header("Forwarded") is None for r in hidden.requests)
    finally:
        server.stop()


def test_serve_flags(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "rendezvous", "serve", "--proxy-protocol-from", "10.0.0.0/8,nope",
         "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert "--proxy-protocol-from: 'nope' is not an IP network" in bad.stderr
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--data-dir", str(tmp_path / "data"), "--no-tls", "--forwarded",
             "--proxy-protocol-from", f"{BALANCER}"], stdout=sink, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 20, proc)
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=(BALANCER, 0)) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n" + request)
            assert recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 401")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n" + request)
            assert recv_all(sock) == responses.status_only(400)
    finally:
        stop_process(proc)
    assert "PROXY header from an untrusted address" in log.read_text()
