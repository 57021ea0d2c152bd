"""The pool of established internal connections between cluster nodes (issue 15).

Real `rendezvous serve --cluster` processes on a real redis-server; the counts come from each
node's status socket (`rendezvous status`): ``internal_opened`` (connections this node opened,
one TLS handshake each), ``internal_reused`` (forwarded clients sent on a pooled one),
``internal_idle`` (pooled now) and ``internal_accepted`` (opened to it by other nodes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from harness import HiddenHTTPService
from prometheus_client.parser import text_string_to_metric_families
from support import free_port
from test_cluster import Node, add_entry, digest_client, running_nodes

from rendezvous.registry import Entry
from rendezvous.server.cluster import CLUSTER_CERT_NAME, InternalPools, cluster_ssl_contexts
from rendezvous.server.local import ask_relay

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def status(node: Node) -> dict[str, Any]:
    # (running_nodes gives every node the data folder tmp_path/data, next to its log)
    return ask_relay(node.log.parent / "data" / f"relay-{node.port}.sock")


def internal(node: Node) -> dict[str, int]:
    counts: dict[str, int] = status(node)["cluster"]
    return counts


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


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


def test_forwarded_clients_go_out_on_pooled_connections(tmp_path: Path, redis_url: str) -> None:
    with running_nodes(tmp_path, redis_url, "AB",
                       ("--cluster-pool", "3", "--forwarded")) as nodes:
        a, b = nodes["A"], nodes["B"]
        entry = add_entry(redis_url)
        with HiddenHTTPService(a, entry, parked=2) as service:  # type: ignore[arg-type]
            assert get_through(b, entry, "/first").startswith(b"HTTP/1.1 200")
            wait_for(lambda: internal(b)["internal_idle"] == 3, "B's pool filled")
            assert internal(b)["internal_opened"] == 4  # the first client's, then the pool
            for n in range(5):
                answer = get_through(b, entry, f"/again/{n}", source="127.0.0.7")
                assert answer.startswith(b"HTTP/1.1 200"), answer
            wait_for(lambda: internal(b)["internal_idle"] == 3, "B's pool refilled")
            counts = internal(b)
            assert counts["internal_reused"] == 5
            # One refill per pooled connection taken: every handshake carried one client, or
            # is one of those waiting.
            assert counts["internal_opened"] == 6 + 3
            assert internal(a)["internal_accepted"] == counts["internal_opened"]
            assert internal(a)["internal_opened"] == 0  # A forwarded nothing
            # A Digest client (challenged by B itself) and a body of megabytes, on a pooled one.
            body = os.urandom(3 * 1024 * 1024)
            with digest_client(b, entry) as client:
                posted = client.post("/upload", content=body)
            assert posted.json() == {"length": len(body),
                                     "sha256": hashlib.sha256(body).hexdigest()}
            assert internal(b)["internal_reused"] == 6
        # The owning node still learns who each client is (B's Forwarded header).
        again = [r for r in service.requests if r.path.startswith("/again/")]
        assert [r.path for r in again] == [f"/again/{n}" for n in range(5)]
        assert all((r.header("forwarded") or "").startswith("for=127.0.0.7;") for r in again)


def test_a_killed_node_leaves_no_pooled_connection_in_use(tmp_path: Path,
                                                          redis_url: str) -> None:
    with running_nodes(tmp_path, redis_url, "ABC", ("--cluster-pool", "2")) as nodes:
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        entry = add_entry(redis_url)
        hidden = a.park(entry)
        a.wait_parked(entry.uuid, 1)
        client = send_request(b, entry, "/before")
        assert answer_one(hidden).startswith(b"GET /before ")
        assert read_all(client).startswith(b"HTTP/1.1 200")
        wait_for(lambda: internal(b)["internal_idle"] == 2, "B's pool filled")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(5)
        wait_for(lambda: internal(b)["internal_idle"] == 0, "B's pool for A drained")
        # A is still listed until its heartbeat expires: B finds it unreachable, and with the
        # hidden server parked nowhere else the client gets the 404 after --pair-wait.
        assert get_through(b, entry, "/meanwhile").startswith(b"HTTP/1.1 404")
        hidden = c.park(entry)
        c.wait_parked(entry.uuid, 1)
        client = send_request(b, entry, "/after")
        assert answer_one(hidden).startswith(b"GET /after ")
        assert read_all(client).startswith(b"HTTP/1.1 200")
        counts = internal(b)
        assert counts["internal_reused"] == 0  # neither client went out on a dead connection


def test_a_burst_of_clients_keeps_no_more_than_the_pool_idle(tmp_path: Path,
                                                              redis_url: str) -> None:
    clients = 24
    with running_nodes(tmp_path, redis_url, "AB", ("--cluster-pool", "2")) as nodes:
        a, b = nodes["A"], nodes["B"]
        entry = add_entry(redis_url)
        with HiddenHTTPService(a, entry, parked=8):  # type: ignore[arg-type]
            answers: list[bytes] = []
            start = threading.Barrier(clients + 1)

            def one(n: int) -> None:
                start.wait(10)
                answers.append(get_through(b, entry, f"/burst/{n}"))

            threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
            for thread in threads:
                thread.start()
            start.wait(10)
            most = 0
            while any(thread.is_alive() for thread in threads):
                most = max(most, internal(b)["internal_idle"])
                time.sleep(0.01)
            for thread in threads:
                thread.join(10)
            assert len(answers) == clients
            assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
            wait_for(lambda: internal(b)["internal_idle"] == 2, "B's pool refilled")
            counts = internal(b)
            assert most <= 2
            # Clients that found the pool empty opened their own; none of those was kept.
            assert counts["internal_opened"] == clients + 2
            # A holds the hidden server's parked connections and B's two idle ones, no more.
            wait_for(lambda: status(a)["relay"]["open"] == 8 + 2, "A's connections settled")


def test_idle_pooled_connections_expire_on_both_nodes(tmp_path: Path, redis_url: str) -> None:
    # A head timeout shorter than the pool's idle time: A waits for the first head of an
    # internal connection that much longer, so it never cuts one B still holds.
    with running_nodes(tmp_path, redis_url, "AB", ("--cluster-pool", "2", "--cluster-pool-idle",
                                                   "0.8", "--head-timeout", "0.5")) as nodes:
        a, b = nodes["A"], nodes["B"]
        entry = add_entry(redis_url)
        hidden = a.park(entry)
        a.wait_parked(entry.uuid, 1)
        assert internal(b)["internal_idle"] == 0  # (B's first status answer imports a lot)
        client = send_request(b, entry, "/once")
        answer_one(hidden)
        assert read_all(client).startswith(b"HTTP/1.1 200")
        wait_for(lambda: internal(b)["internal_idle"] == 2, "B's pool filled")
        filled = time.monotonic()
        wait_for(lambda: internal(b)["internal_idle"] == 0, "B's pool expired", timeout=5)
        assert time.monotonic() - filled > 0.5  # (0.8 s after they were opened)
        wait_for(lambda: status(a)["relay"]["open"] == 0, "A's side closed")
        # B closed them before A's own wait for a first head ran out: A rejected nothing.
        assert "head timeout" not in a.log.read_text()
        assert internal(b)["internal_opened"] == 3


def test_a_leaving_node_closes_the_connections_pooled_for_it(tmp_path: Path,
                                                             redis_url: str) -> None:
    with running_nodes(tmp_path, redis_url, "AB", ("--cluster-pool", "2")) as nodes:
        a, b = nodes["A"], nodes["B"]
        entry = add_entry(redis_url)
        first, second = a.park(entry), a.park(entry)
        a.wait_parked(entry.uuid, 2)
        client = send_request(b, entry, "/once")
        answer_one(second)  # (the newest parked connection serves first)
        assert read_all(client).startswith(b"HTTP/1.1 200")
        wait_for(lambda: internal(b)["internal_idle"] == 2, "B's pool filled")
        # A pairing on A keeps A in its shutdown grace (10 s) after SIGTERM ...
        local = send_request(a, entry, "/slow")
        first.settimeout(10)
        assert first.recv(100).startswith(b"GET /slow ")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        # ... but what B holds idle for A is closed at once, not at the grace's end.
        wait_for(lambda: internal(b)["internal_idle"] == 0, "B's pool for A closed", timeout=5)
        assert a.proc.poll() is None  # (still in its grace)
        first.sendall(ANSWER)
        first.close()
        assert read_all(local).startswith(b"HTTP/1.1 200")
        a.proc.wait(10)


def test_a_pooled_connection_the_other_side_closed_is_never_handed_out() -> None:
    # In one process, so the check runs before this loop has read the close: only the
    # kernel's view of the socket (not the protocol's callbacks) can tell.
    asyncio.run(_closed_under_us())


class _Silent(asyncio.Protocol):
    def __init__(self, seen: list[asyncio.Transport] | None = None) -> None:
        self.seen = seen
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.seen is not None:
            self.seen.append(self.transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def _closed_under_us() -> None:
    loop = asyncio.get_running_loop()
    server_context, client_context = cluster_ssl_contexts("pool-test-key-0123456789")
    accepted: list[asyncio.Transport] = []
    server = await loop.create_server(lambda: _Silent(accepted), "127.0.0.1", 0,
                                      ssl=server_context)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def open_connection(where: str, factory: Callable[[], Any]) -> tuple[Any, Any]:
        host, _, port = where.rpartition(":")
        return await loop.create_connection(factory, host, int(port), ssl=client_context,
                                            server_hostname=CLUSTER_CERT_NAME)

    pools = InternalPools(open_connection, loop=loop, size=2, idle=30.0)
    handed: list[_Silent] = []
    try:
        first = await pools.get(address, _Silent, lambda p: not p.lost)
        handed.append(first)
        for _ in range(500):
            if pools.idle_count(address) == 2 and len(accepted) == 3:
                break
            await asyncio.sleep(0.01)
        assert pools.idle_count(address) == 2 and pools.opened == 3
        for transport in accepted[1:]:  # the pooled ones, cut by the other side ...
            with socket.fromfd(transport.get_extra_info("socket").fileno(), socket.AF_INET,
                               socket.SOCK_STREAM) as dup:
                dup.shutdown(socket.SHUT_RDWR)  # the FIN leaves now
        time.sleep(0.2)  # ... while this loop reads nothing (the FINs reach our kernel)
        taken = await pools.get(address, _Silent, lambda p: not p.lost)
        handed.append(taken)
        assert pools.reused == 0  # both pooled ones were found closed and dropped
        assert pools.opened == 4  # a new connection carries the client instead
        assert taken is not first and not taken.lost
    finally:
        await pools.close()
        for transport in [*accepted, *(p.transport for p in handed if p.transport)]:
            transport.abort()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # (the aborts' callbacks run)


def test_the_pool_is_on_the_admin_pages_metrics(tmp_path: Path, redis_url: str) -> None:
    admin = free_port()
    with running_nodes(tmp_path, redis_url, "AB", ("--cluster-pool", "2"),
                       only={"B": ("--admin", f"127.0.0.1:{admin}")}) as nodes:
        a, b = nodes["A"], nodes["B"]
        entry = add_entry(redis_url)
        for path in ("/one", "/two"):
            hidden = a.park(entry)
            a.wait_parked(entry.uuid, 1)
            client = send_request(b, entry, path)
            answer_one(hidden)
            assert read_all(client).startswith(b"HTTP/1.1 200")
            wait_for(lambda: internal(b)["internal_idle"] == 2, "B's pool filled")
        answer = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=10)
        assert answer.status_code == 200
        samples = {sample.name: sample.value
                   for family in text_string_to_metric_families(answer.text)
                   for sample in family.samples}
        assert samples["rendezvous_cluster_forwarded_total"] == 2
        assert samples["rendezvous_cluster_internal_opened_total"] == 1 + 2 + 1
        assert samples["rendezvous_cluster_internal_reused_total"] == 1
        assert samples["rendezvous_cluster_internal_idle"] == 2
        assert samples["rendezvous_cluster_internal_accepted_total"] == 0


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
