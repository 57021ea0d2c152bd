"""Three relay nodes on one real redis-server: any node pairs any hidden server.

Every node is a real `rendezvous serve --cluster ...` process; hidden servers park on one node
and mobile clients come in through the others.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import websockets.sync.client
from conftest import flush_redis
from harness import PARKED, HiddenHTTPService, make_certificate, recv_exactly
from hidden_support import AgentProcess, LocalHTTP
from support import free_port, stop_process, tail, wait_for_port, wait_for_text
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from rendezvous.protocol.totp import current_token
from rendezvous.provisioning import provisioning_document, write_provisioning
from rendezvous.registry import Entry, new_secret

CLUSTER_KEY = "test-cluster-key-0123456789"
TTL = 1.5  # seconds a dead node stays listed: short, so the kill test is quick


@dataclass
class Node:
    """One relay node process, with what HiddenHTTPService needs to park at it."""

    name: str
    port: int
    internal: int
    cert: Path
    log: Path
    redis_url: str
    cluster_url: str
    proc: subprocess.Popen[bytes] | None = None
    sockets: list[ssl.SSLSocket] = field(default_factory=list)
    extra: tuple[str, ...] = ()  # more `serve` flags

    def start(self, data_dir: Path) -> None:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port",
                 str(self.port), "--data-dir", str(data_dir), "--registry", self.redis_url,
                 "--cluster", self.cluster_url, "--node-id", self.name, "--internal",
                 f"127.0.0.1:{self.internal}", "--cluster-ttl", str(TTL), "--settle", "0",
                 "--pair-wait", "2", *self.extra],
                stdout=sink, stderr=subprocess.STDOUT,
                env={**os.environ, "RENDEZVOUS_CLUSTER_KEY": CLUSTER_KEY})
        wait_for_port("127.0.0.1", self.port, 20, self.proc)

    def connect(self, source: str | None = None) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.cert))
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                       source_address=(source, 0) if source else None)
        return context.wrap_socket(raw, server_hostname="127.0.0.1")

    def park(self, entry: Entry, token: str | None = None,
             source: str | None = None) -> ssl.SSLSocket:
        sock = self.connect(source)
        token = token or current_token(entry.base32, entry.step, entry.digits)
        sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        assert recv_exactly(sock, len(PARKED)) == PARKED
        return sock

    def published(self, uuid: str) -> int:
        """This node's parked count for ``uuid`` as the cluster sees it."""
        client = redis.Redis.from_url(self.cluster_url)
        try:
            value = client.hget(f"rendezvous:parked:{uuid}", self.name)
        finally:
            client.close()
        return int(value or 0)

    def wait_parked(self, uuid: str, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.published(uuid) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {self.published(uuid)} parked, not {count}"
                                     f"\n{tail(self.log)}")
            time.sleep(0.02)

    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@contextlib.contextmanager
def running_nodes(tmp_path: Path, redis_url: str, names: str, extra: tuple[str, ...] = (),
                  only: dict[str, tuple[str, ...]] | None = None) -> Iterator[dict[str, Node]]:
    """One `serve --cluster` process per letter of ``names``, on empty Redis databases; each
    gets the `serve` flags ``extra`` too, and those ``only[name]`` has for it."""
    cluster_url = redis_url.rsplit("/", 1)[0] + "/1"
    flush_redis(redis_url)
    flush_redis(cluster_url)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tls = make_certificate(data_dir)  # every node serves the same certificate
    found = {name: Node(name, free_port(), free_port(), tls.cert_file,
                        tmp_path / f"{name}.log", redis_url, cluster_url,
                        extra=(*extra, *(only or {}).get(name, ())))
             for name in names}
    try:
        for node in found.values():
            node.start(data_dir)
        yield found
    finally:
        for node in found.values():
            node.stop()


@pytest.fixture
def nodes(tmp_path: Path, redis_url: str) -> Iterator[dict[str, Node]]:
    with running_nodes(tmp_path, redis_url, "ABC") as found:
        yield found


def add_entry(redis_url: str) -> Entry:
    entry = Entry(uuid=f"cluster-{time.monotonic_ns()}", base32=new_secret())
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(entry.uuid, json.dumps(entry.to_record()))
    finally:
        client.close()
    return entry


def digest_client(node: Node, entry: Entry) -> httpx.Client:
    return httpx.Client(base_url=node.url(), auth=httpx.DigestAuth(entry.uuid, "x"),
                        verify=ssl.create_default_context(cafile=str(node.cert)), timeout=20)


def test_hidden_server_on_a_is_reached_through_b_and_c(nodes: dict[str, Node],
                                                       redis_url: str) -> None:
    entry = add_entry(redis_url)
    body = os.urandom(3 * 1024 * 1024)
    with HiddenHTTPService(nodes["A"], entry, parked=2) as service:  # type: ignore[arg-type]
        for name in "BC":
            with digest_client(nodes[name], entry) as client:
                answer = client.get(f"/via/{name}")
                assert answer.status_code == 200, answer.text
                assert answer.json()["path"] == f"/via/{name}"
                posted = client.post("/upload", content=body)
                assert posted.json() == {"length": len(body),
                                         "sha256": hashlib.sha256(body).hexdigest()}
        assert service.pairings >= 2
    for name in "BC":
        wait_for_text(nodes[name].log.read_text, " forwarded ")


def test_websocket_through_another_node(nodes: dict[str, Node], redis_url: str) -> None:
    entry = add_entry(redis_url)
    hidden = nodes["A"].park(entry)
    nodes["A"].wait_parked(entry.uuid, 1)
    context = ssl.create_default_context(cafile=str(nodes["C"].cert))

    def echo_one() -> None:
        protocol = ServerProtocol()
        while True:
            data = hidden.recv(65536)
            protocol.receive_data(data)
            events = protocol.events_received()
            if events:
                break
        request = events[0]
        protocol.send_response(protocol.accept(request))  # type: ignore[arg-type]
        hidden.sendall(b"".join(protocol.data_to_send()))
        for _ in range(100):  # echo text frames until the client's close (answered too)
            data = hidden.recv(65536)
            if not data:
                return
            protocol.receive_data(data)
            for event in protocol.events_received():
                if isinstance(event, Frame) and event.opcode == Opcode.TEXT:
                    protocol.send_text(event.data)
            hidden.sendall(b"".join(protocol.data_to_send()))
            if protocol.close_expected():
                hidden.close()  # the server side ends the TCP connection (RFC 6455 §7.1.1)
                return

    thread = threading.Thread(target=echo_one, daemon=True)
    thread.start()
    with websockets.sync.client.connect(
            f"wss://127.0.0.1:{nodes['C'].port}/ws?rendezvous={entry.uuid}", ssl=context,
            open_timeout=10) as ws:
        ws.send("hello across nodes")
        assert ws.recv(timeout=10) == "hello across nodes"
    thread.join(5)
    hidden.close()


def test_a_node_whose_listing_lapsed_publishes_its_counts_again(nodes: dict[str, Node],
                                                                 redis_url: str) -> None:
    entry = add_entry(redis_url)
    a = nodes["A"]
    hidden = a.park(entry)
    a.wait_parked(entry.uuid, 1)
    # What a heartbeat late by more than the TTL looks like from Redis: A's listing expired and
    # another node's lookup pruned A's count as a dead node's.
    client = redis.Redis.from_url(a.cluster_url)
    try:
        client.delete("rendezvous:node:A")
        client.hdel(f"rendezvous:parked:{entry.uuid}", "A")
    finally:
        client.close()
    # A's next heartbeat (every TTL / 3) finds its key gone and publishes its counts at once,
    # well before the full resync (every ten heartbeats), so visitors on B find it again.
    a.wait_parked(entry.uuid, 1, timeout=TTL * 10 / 3 / 2)
    client_sock = nodes["B"].connect()
    auth = base64.b64encode(f"{entry.uuid}:x".encode()).decode()
    client_sock.sendall(f"GET /again HTTP/1.1\r\nHost: relay\r\nAuthorization: Basic {auth}\r\n"
                        f"Connection: close\r\n\r\n".encode())
    hidden.settimeout(10)
    assert hidden.recv(100).startswith(b"GET /again ")
    hidden.close()
    client_sock.close()


def test_wrong_cluster_key_cannot_join_the_conversation(nodes: dict[str, Node]) -> None:
    from rendezvous.server.cluster import CLUSTER_CERT_NAME, cluster_ssl_contexts

    _, stranger = cluster_ssl_contexts("some-other-key-0123456789")
    raw = socket.create_connection(("127.0.0.1", nodes["A"].internal), timeout=5)
    with (pytest.raises((ssl.SSLError, ConnectionResetError)),
          stranger.wrap_socket(raw, server_hostname=CLUSTER_CERT_NAME) as sock):
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        sock.recv(1)


def test_a_dead_node_is_forgotten_and_its_hidden_servers_repark_elsewhere(
        nodes: dict[str, Node], redis_url: str, tmp_path: Path) -> None:
    entry = add_entry(redis_url)
    a, b, c = nodes["A"], nodes["B"], nodes["C"]
    config = tmp_path / "hub.json"
    write_provisioning(provisioning_document(entry, "127.0.0.1", a.port, a.cert.read_text()),
                       config)
    local = LocalHTTP()
    local.start()
    agent = AgentProcess(tmp_path / "agent.log", [
        "--config", str(config), "--forward", local.address, "--pool", "2",
        "--server", f"127.0.0.1:{a.port}", "--server", f"127.0.0.1:{c.port}",
        "--backoff-cap", "1"])
    try:
        a.wait_parked(entry.uuid, 2)
        with digest_client(b, entry) as client:
            assert client.get("/before").status_code == 200  # through B to A
        # An active pairing through A, cut when A dies.
        active = b.connect()
        active.sendall(f"GET /sleep/3 HTTP/1.1\r\nAuthorization: Basic "
                       f"{base64.b64encode(f'{entry.uuid}:x'.encode()).decode()}\r\n\r\n"
                       .encode())
        assert local.sleeping.wait(5)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(5)
        active.settimeout(5)
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            assert not active.recv(100).startswith(b"HTTP/1.1 200")
        active.close()
        # The agent moves on to C by itself; clients through B are served again.
        c.wait_parked(entry.uuid, 2, timeout=15)
        with digest_client(b, entry) as client:
            assert client.get("/after").status_code == 200
        # After A's heartbeat has expired nobody routes to it any more.
        time.sleep(TTL + 0.5)
        mark = len(b.log.read_text())
        with digest_client(b, entry) as client:
            assert client.get("/later").status_code == 200
        assert "node=A" not in b.log.read_text()[mark:]
    finally:
        assert agent.terminate() == 0
        local.stop()


def test_client_waiting_on_b_is_served_when_the_hidden_server_parks_on_a_later(
        nodes: dict[str, Node], redis_url: str) -> None:
    entry = add_entry(redis_url)
    with nodes["B"].connect() as mobile:
        mobile.sendall(f"GET /early HTTP/1.1\r\nAuthorization: Basic "
                       f"{base64.b64encode(f'{entry.uuid}:x'.encode()).decode()}\r\n\r\n"
                       .encode())
        time.sleep(0.4)  # B found no parked connection anywhere and keeps looking
        hidden = nodes["A"].park(entry)
        hidden.settimeout(5)
        assert hidden.recv(100).startswith(b"GET /early HTTP/1.1")
        hidden.close()


def test_a_code_parks_on_another_node_only_from_the_address_that_used_it(
        nodes: dict[str, Node], redis_url: str) -> None:
    # Issue 11 item 6 across nodes: a leaked code replayed on another node takes nothing.
    entry = add_entry(redis_url)
    token = current_token(entry.base32, entry.step, entry.digits)
    real = nodes["A"].park(entry, token, source="127.0.0.2")
    with nodes["B"].connect(source="127.0.0.3") as stolen:
        stolen.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        assert recv_exactly(stolen, 16) == b"HTTP/1.1 401\r\n\r\n"
    same_place = nodes["B"].park(entry, token, source="127.0.0.2")  # its own code, elsewhere
    nodes["A"].wait_parked(entry.uuid, 1)
    nodes["B"].wait_parked(entry.uuid, 1)
    real.close()
    same_place.close()
