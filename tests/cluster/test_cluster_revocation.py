"""Revocation on every node: two `rendezvous serve --cluster` processes on one Redis, and the CLI
in a third process rotating, guarding and removing a hidden server parked on both."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import HiddenHTTPService
from revocation_support import REVOKED_WITHIN, closed_by_relay, users
from test_cluster import Node, add_entry, digest_client, running_nodes

from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry, open_registry

PASSWORD = "open sesame"


@pytest.fixture
def two_nodes(tmp_path: Path, redis_url: str) -> Iterator[dict[str, Node]]:
    with running_nodes(tmp_path, redis_url, "AB") as found:
        yield found


def connect_status(node: Node, entry: Entry) -> bytes:
    with node.connect() as sock:
        token = current_token(entry.base32, entry.step, entry.digits)
        sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        return sock.recv(12)


def visitor(node: Node, uuid: str, password: str) -> httpx.Client:
    return httpx.Client(base_url=node.url(), auth=httpx.DigestAuth(uuid, password),
                        verify=ssl.create_default_context(cafile=str(node.cert)), timeout=20)


def test_rotate_visitor_and_remove_reach_every_node(two_nodes: dict[str, Node], redis_url: str,
                                                    tmp_path: Path) -> None:
    a, b = two_nodes["A"], two_nodes["B"]
    old = add_entry(redis_url)
    parked = [a.park(old), a.park(old), b.park(old), b.park(old)]
    a.wait_parked(old.uuid, 2)
    b.wait_parked(old.uuid, 2)

    start = time.monotonic()
    users(redis_url, tmp_path, "rotate", old.uuid, "--no-ca", "--out", str(tmp_path / "p"))
    for sock in parked:
        assert closed_by_relay(sock, max(0.0, start + REVOKED_WITHIN - time.monotonic()))
        sock.close()
    for node in (a, b):
        node.wait_parked(old.uuid, 0, timeout=1.0)
        assert connect_status(node, old) == b"HTTP/1.1 401"
    with digest_client(a, old) as client:
        assert client.get("/old").status_code == 404  # nothing parked on any node

    async def read() -> Entry | None:
        registry = open_registry(redis_url)
        try:
            return await registry.get(old.uuid)
        finally:
            await registry.close()

    new = asyncio.run(read())
    assert new is not None and not new.same_secret(old)
    with HiddenHTTPService(b, new, parked=2) as service:  # type: ignore[arg-type]
        with digest_client(a, new) as client:  # through A, to B's parked connection
            assert client.get("/new").status_code == 200

        # A visitor password set from the CLI applies on B (the node holding the connection)
        # within the same 2 s, and a refused visitor uses up no parked connection.
        users(redis_url, tmp_path, "visitor", new.uuid, "--password", PASSWORD)
        start = time.monotonic()
        with visitor(a, new.uuid, "x") as client:
            while (status := client.get("/guessing").status_code) == 200:
                assert time.monotonic() - start < REVOKED_WITHIN
                time.sleep(0.05)
            assert status == 401
        pairings = service.pairings
        b.wait_parked(new.uuid, 2)
        with visitor(b, new.uuid, "x") as client:
            assert client.get("/guessing").status_code == 401
        assert service.pairings == pairings
        with visitor(a, new.uuid, PASSWORD) as client:
            assert client.get("/with-password").status_code == 200


    # Remove: B's connection parked with the current secret goes too, and A finds none.
    last = b.park(new)
    b.wait_parked(new.uuid, 1)
    start = time.monotonic()
    users(redis_url, tmp_path, "remove", new.uuid)
    assert closed_by_relay(last, max(0.0, start + REVOKED_WITHIN - time.monotonic()))
    last.close()
    with visitor(a, new.uuid, PASSWORD) as client:
        assert client.get("/removed").status_code == 404
    assert connect_status(b, new) == b"HTTP/1.1 401"
