"""Internal links between cluster nodes, and remembered routes (issue 15).

Real `rendezvous serve --cluster` processes on a real redis-server; the counts come from each
node's status socket (`rendezvous status`): ``links_opened`` (links this node opened, one TLS
handshake each), ``links`` (open now), ``links_accepted``/``links_in`` (opened to it by other
nodes), ``streams_out``/``streams_in`` (forwarded clients, one stream each), and
``route_hits``/``route_misses`` (clients sent straight to the node that took their ID's last
client, taken or refused).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
from harness import HiddenHTTPService
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, wait_for
from test_cluster import Node, add_entry, digest_client, running_nodes

from rendezvous.registry import Entry
from rendezvous.server.cluster import CLUSTER_CERT_NAME, cluster_ssl_contexts
from rendezvous.server.local import ask_relay

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def status(node: Node) -> dict[str, Any]:
    # (running_nodes gives every node the data folder tmp_path/data, next to its log)
    return ask_relay(node.log.parent / "data" / f"relay-{node.port}.sock")


def internal(node: Node) -> dict[str, int]:
    counts: dict[str, int] = status(node)["cluster"]
    return counts



def send_request(node: Node, entry: Entry, path: str,
                 source: str | None = None) -> ssl.SSLSocket:
    sock = node.connect(source)
    auth = base64.b64encode(f"{entry.uuid}:x".encode()).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Basic {auth}\r\n"
                 f"Connection: close\r\n\r\n".encode())
    return sock


def read_all(sock: ssl.SSLSocket) -> bytes:
    chunks = []
    with sock:
        sock.settimeout(10)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get_through(node: Node, entry: Entry, path: str, source: str | None = None) -> bytes:
    """One request through ``node`` (Basic, so no challenge round), its whole answer."""
    return read_all(send_request(node, entry, path, source))


def answer_one(hidden: ssl.SSLSocket) -> bytes:
    """Read the request a parked connection was paired with, answer it, close; the head."""
    hidden.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = hidden.recv(65536)
        assert chunk, head
        head += chunk
    hidden.sendall(ANSWER)
    hidden.close()
    return head


def pair_once(holder: Node, entry_node: Node, entry: Entry, path: str) -> None:
    """Park one connection on ``holder`` and pair it with a client entering at ``entry_node``."""
    hidden = holder.park(entry)
    holder.wait_parked(entry.uuid, 1)
    client = send_request(entry_node, entry, path)
    assert answer_one(hidden).startswith(f"GET {path} ".encode())
    assert read_all(client).startswith(b"HTTP/1.1 200")


def test_forwarded_clients_share_one_link(tmp_path: Path, redis_url: str) -> None:
    with running_nodes(tmp_path, redis_url, "AB", ("--forwarded",)) as nodes:
        a, b = nodes["A"], nodes["B"]
        entry = add_entry(redis_url)
        with HiddenHTTPService(a, entry, parked=2) as service:  # type: ignore[arg-type]
            assert get_through(b, entry, "/first").startswith(b"HTTP/1.1 200")
            counts = internal(b)
            assert (counts["links_opened"], counts["links"], counts["streams_out"]) == (1, 1, 1)
            assert counts["route_hits"] == 0  # (the first one was looked up in Redis)
            for n in range(5):
                answer = get_through(b, entry, f"/again/{n}", source="127.0.0.7")
                assert answer.startswith(b"HTTP/1.1 200"), answer
            counts = internal(b)
            assert counts["links_opened"] == 1  # one handshake for every forwarded client
            # Each went straight to A; one that came while the service was re-parking both of
            # its connections was refused, then looked up (one more stream).
            assert counts["route_hits"] + counts["route_misses"] == 5
            assert counts["route_hits"] >= 3
            streams = 6 + counts["route_misses"]
            assert counts["streams_out"] == streams
            on_a = internal(a)
            assert (on_a["links_accepted"], on_a["links_in"]) == (1, 1)
            assert on_a["streams_in"] == streams
            assert on_a["links_opened"] == 0  # A forwarded nothing
            # A Digest client (challenged by B itself) and megabytes on the link.
            body = os.urandom(3 * 1024 * 1024)
            with digest_client(b, entry) as client:
                posted = client.post("/upload", content=body)
                assert posted.json() == {"length": len(body),
                                         "sha256": hashlib.sha256(body).hexdigest()}
            assert internal(b)["links_opened"] == 1
        # The owning node still learns who each client is (B's Forwarded header).
        again = [r for r in service.requests if r.path.startswith("/again/")]
        assert [r.path for r in again] == [f"/again/{n}" for n in range(5)]
        assert all((r.header("forwarded") or "").startswith("for=127.0.0.7;") for r in again)
        # Streams end with their clients: nothing is left open on A but the link itself.
        wait_for(lambda: status(a)["relay"]["open"] == 0, "A's streams closed")
        # What an operator reads in a terminal.
        shown = subprocess.run(
            [sys.executable, "-m", "rendezvous", "status", "--socket",
             str(b.log.parent / "data" / f"relay-{b.port}.sock")],
            capture_output=True, text=True, timeout=30, check=True).stdout
        counts = internal(b)
        assert (f"cluster: links out 1 (opened 1), in 0; forwarded clients out "
                f"{counts['streams_out']}, in 0; remembered routes taken "
                f"{counts['route_hits']}, refused {counts['route_misses']}") in shown


def test_a_hidden_server_that_moved_costs_one_refused_probe(tmp_path: Path,
                                                            redis_url: str) -> None:
    with running_nodes(tmp_path, redis_url, "ABC") as nodes:
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        entry = add_entry(redis_url)
        pair_once(a, b, entry, "/on-a")
        # The hidden server now parks on C only. B still remembers A: A refuses at once (it
        # has nothing parked), B asks Redis, and C serves the client.
        hidden = c.park(entry)
        c.wait_parked(entry.uuid, 1)
        started = time.monotonic()
        client = send_request(b, entry, "/moved")
        assert answer_one(hidden).startswith(b"GET /moved ")
        assert read_all(client).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 1.5  # not after A's --pair-wait (2 s)
        counts = internal(b)
        assert (counts["route_hits"], counts["route_misses"]) == (0, 1)
        assert internal(c)["streams_in"] == 1
        # ... and the next client goes straight to C.
        hidden = c.park(entry)
        c.wait_parked(entry.uuid, 1)
        client = send_request(b, entry, "/again")
        assert answer_one(hidden).startswith(b"GET /again ")
        assert read_all(client).startswith(b"HTTP/1.1 200")
        assert internal(b)["route_hits"] == 1
        # A saw a probe it could not take: not a visitor's failure, nothing refused is logged.
        assert "404" not in a.log.read_text()


def test_without_routes_every_client_is_looked_up(tmp_path: Path, redis_url: str) -> None:
    with running_nodes(tmp_path, redis_url, "AB", ("--cluster-routes", "0")) as nodes:
        a, b = nodes["A"], nodes["B"]
        entry = add_entry(redis_url)
        with HiddenHTTPService(a, entry, parked=2):  # type: ignore[arg-type]
            for n in range(3):
                assert get_through(b, entry, f"/{n}").startswith(b"HTTP/1.1 200")
        counts = internal(b)
        assert (counts["route_hits"], counts["route_misses"], counts["streams_out"]) == (0, 0, 3)


def test_a_killed_node_takes_its_link_and_route_with_it(tmp_path: Path,
                                                        redis_url: str) -> None:
    with running_nodes(tmp_path, redis_url, "ABC") as nodes:
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        entry = add_entry(redis_url)
        pair_once(a, b, entry, "/before")
        assert internal(b)["links"] == 1
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(5)
        wait_for(lambda: internal(b)["links"] == 0, "B's link to A closed")
        # B's remembered route and Redis (A is listed until its heartbeat expires) both point
        # at A, which cannot be reached: with the hidden server parked nowhere else the
        # client gets the 404 after --pair-wait.
        assert get_through(b, entry, "/meanwhile").startswith(b"HTTP/1.1 404")
        pair_once(c, b, entry, "/after")
        assert internal(b)["links"] == 1  # the one to C


def test_a_leaving_node_keeps_its_forwarded_pairings_but_takes_no_new_ones(
        tmp_path: Path, redis_url: str) -> None:
    with running_nodes(tmp_path, redis_url, "ABC") as nodes:
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        entry = add_entry(redis_url)
        first, second = a.park(entry), a.park(entry)
        a.wait_parked(entry.uuid, 2)
        # A forwarded pairing under way on A (through B's link) keeps A in its shutdown
        # grace (10 s) after SIGTERM ...
        slow = send_request(b, entry, "/slow")
        second.settimeout(10)
        assert second.recv(100).startswith(b"GET /slow ")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        # ... A says GOAWAY at once: B opens nothing new on that link, and the next client
        # goes to C, where the hidden server re-parked.
        wait_for(lambda: internal(b)["links"] == 0, "B's link to A draining")
        assert a.proc.poll() is None  # (still in its grace)
        hidden = c.park(entry)
        c.wait_parked(entry.uuid, 1)
        client = send_request(b, entry, "/next")
        assert answer_one(hidden).startswith(b"GET /next ")
        assert read_all(client).startswith(b"HTTP/1.1 200")
        # The pairing on the draining link still completes, byte for byte.
        second.sendall(ANSWER)
        second.close()
        assert read_all(slow).startswith(b"HTTP/1.1 200")
        first.close()
        a.proc.wait(10)


def test_the_links_are_on_the_admin_pages_metrics(tmp_path: Path, redis_url: str) -> None:
    admin = free_port()
    with running_nodes(tmp_path, redis_url, "AB",
                       only={"B": ("--admin", f"127.0.0.1:{admin}")}) as nodes:
        a, b = nodes["A"], nodes["B"]
        entry = add_entry(redis_url)
        for path in ("/one", "/two"):
            pair_once(a, b, entry, path)
        answer = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=10)
        assert answer.status_code == 200
        samples = {sample.name: sample.value
                   for family in text_string_to_metric_families(answer.text)
                   for sample in family.samples}
        assert samples["rendezvous_cluster_forwarded_total"] == 2
        assert samples["rendezvous_cluster_links_opened_total"] == 1
        assert samples["rendezvous_cluster_links"] == 1
        assert samples["rendezvous_cluster_streams_out_total"] == 2
        assert samples["rendezvous_cluster_route_hits_total"] == 1
        assert samples["rendezvous_cluster_route_misses_total"] == 0
        assert samples["rendezvous_cluster_links_accepted_total"] == 0


def test_internal_handshakes_send_no_session_tickets() -> None:
    # Nothing resumes an internal session: tickets would only be work for both nodes.
    server_context, client_context = cluster_ssl_contexts("ticket-test-key-0123456789")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            raw, _ = listener.accept()
            with server_context.wrap_socket(raw, server_side=True) as sock:
                sock.recv(1)  # until the client closes

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with client_context.wrap_socket(raw, server_hostname=CLUSTER_CERT_NAME) as sock:
            sock.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                sock.recv(1)  # (reads what the server sent after the handshake)
            assert sock.version() == "TLSv1.3"
            assert sock.session is not None and not sock.session.has_ticket
        thread.join(5)
