"""Names across a cluster: two real `rendezvous serve --cluster --domain` processes on one
real redis-server; a hidden server parked on A is reached as https://hub.relay.test/ through
B, because the name -> ID mapping lives in the shared registry."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import flush_redis
from harness import PARKED, HiddenHTTPService, recv_exactly
from named_support import DOMAIN, wildcard_certificate
from support import free_port, stop_process, tail, wait_for_port, wait_for_text

from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry

pytestmark = pytest.mark.timeout(90)

CLUSTER_KEY = "names-cluster-key-0123456789"
CURL = shutil.which("curl")
CLIENT_TIMEOUT = 15


@dataclass
class Node:
    """A relay node process, with the park/wait_parked that HiddenHTTPService uses."""

    name: str
    port: int
    cert: Path
    log: Path
    cluster_url: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, data_dir: Path, registry_url: str, key: Path) -> None:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port",
                 str(self.port), "--data-dir", str(data_dir), "--registry", registry_url,
                 "--cert", str(self.cert), "--key", str(key), "--domain", DOMAIN,
                 "--cluster", self.cluster_url, "--node-id", self.name, "--internal",
                 f"127.0.0.1:{free_port()}", "--settle", "0", "--pair-wait", "2"],
                stdout=sink, stderr=subprocess.STDOUT,
                env={**os.environ, "RENDEZVOUS_CLUSTER_KEY": CLUSTER_KEY})
        wait_for_port("127.0.0.1", self.port, 20, self.proc)

    def park(self, entry: Entry, token: str | None = None,
             source: str | None = None) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.cert))
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        token = token or current_token(entry.base32, entry.step, entry.digits)
        sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        assert recv_exactly(sock, len(PARKED)) == PARKED
        return sock

    def wait_parked(self, uuid: str, count: int, timeout: float = 10.0) -> None:
        client = redis.Redis.from_url(self.cluster_url)
        try:
            deadline = time.monotonic() + timeout
            while int(client.hget(f"rendezvous:parked:{uuid}", self.name) or 0) != count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: not {count} parked\n{tail(self.log)}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def nodes(tmp_path: Path, redis_url: str) -> Iterator[dict[str, Node]]:
    cluster_url = redis_url.rsplit("/", 1)[0] + "/1"
    flush_redis(redis_url)
    flush_redis(cluster_url)
    tls = wildcard_certificate(tmp_path)
    found = {name: Node(name, free_port(), tls.cert_file, tmp_path / f"{name}.log", cluster_url)
             for name in "AB"}
    try:
        for name, node in found.items():
            node.start(tmp_path / f"data-{name}", redis_url, tls.key_file)
        yield found
    finally:
        for node in found.values():
            node.stop()


def rendezvous(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rendezvous", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_a_name_works_on_every_node(nodes: dict[str, Node], redis_url: str,
                                    tmp_path: Path) -> None:
    # Named with the CLI, on the shared registry, while the nodes run.
    added = rendezvous("users", "add", "--uuid", f"c-{time.monotonic_ns()}", "--name", "hub",
                       "--registry", redis_url, "--data-dir", str(tmp_path / "data-A"), "--json")
    assert added.returncode == 0, added.stderr
    document = json.loads(added.stdout)
    entry = Entry(uuid=document["uuid"], base32=document["authParams"]["base32"])
    shown = rendezvous("users", "show", entry.uuid, "--registry", redis_url, "--data-dir",
                       str(tmp_path / "data-A"))
    # `serve --domain` recorded its domain: the URL comes from it.
    assert f"URL:      https://hub.{DOMAIN}:{nodes['A'].port}/" in shown.stdout, shown
    assert CURL is not None
    with HiddenHTTPService(nodes["A"], entry, parked=2) as hidden:  # type: ignore[arg-type]
        for name in "AB":
            node = nodes[name]
            host = f"hub.{DOMAIN}"
            proc = subprocess.run(
                [CURL, "-sS", "--max-time", str(CLIENT_TIMEOUT), "--cacert", str(node.cert),
                 "--resolve", f"{host}:{node.port}:127.0.0.1", "-H", "Authorization: Bearer t",
                 f"https://{host}:{node.port}/via/{name}"],
                capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 5, check=False)
            assert proc.returncode == 0, (proc.stderr, tail(node.log))
            seen = json.loads(proc.stdout)
            assert seen["path"] == f"/via/{name}"
            assert dict((k.lower(), v) for k, v in seen["headers"])["authorization"] == "Bearer t"
        assert hidden.pairings >= 2
    wait_for_text(nodes["B"].log.read_text, " forwarded ")
    # An unknown name on B: the 404 JSON, after its pair_wait of looking nowhere.
    proc = subprocess.run(
        [CURL, "-sS", "--cacert", str(nodes["B"].cert), "--resolve",
         f"nobody.{DOMAIN}:{nodes['B'].port}:127.0.0.1", "-w", "%{http_code}",
         f"https://nobody.{DOMAIN}:{nodes['B'].port}/"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False)
    assert proc.stdout.endswith("404"), proc.stdout
