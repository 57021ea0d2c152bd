"""serve --acme --cluster: account, certificates and pending challenges in the cluster's Redis;
one node orders (under the lock), the others answer its challenges and serve its certificate.

pebble validates TLS-ALPN-01 at node A's port only, while node B orders: B's challenge must be
answered by A. Each node is a relay with its own event loop (and its own data folder, which
must stay free of certificates) on a real redis-server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from pebble_support import (
    MAIN_NAME,
    Pebble,
    PebbleTrustingRelay,
    fingerprint,
    run_pebble,
    wait_for,
)
from support import free_port

from rendezvous.config import AcmeConfig, ClusterConfig, Limits, ServerConfig
from rendezvous.registry import Entry, new_secret
from rendezvous.server.certstore import REDIS_PREFIX, RedisStore
from rendezvous.tls import ensure_self_signed

DOMAIN = MAIN_NAME
CLUSTER_KEY = "acme-cluster-key-0123456789"
LOCK = REDIS_PREFIX + "lock"


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    yield from run_pebble(tmp_path)



class Node(PebbleTrustingRelay):
    """One relay node; clients trust pebble's root."""


@pytest.fixture
def cluster_url(redis_url: str) -> Iterator[str]:
    url = redis_url.rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def start_node(pebble: Pebble, tmp_path: Path, name: str, port: int, registry_url: str,
               cluster_url: str, lock_ttl: float = 6.0) -> Node:
    data_dir = tmp_path / name
    data_dir.mkdir(exist_ok=True)
    config = ServerConfig(
        host="127.0.0.1", port=port, registry_url=registry_url, data_dir=data_dir,
        tls=ensure_self_signed(data_dir, [DOMAIN]), domain=DOMAIN,
        limits=replace(Limits(), registry_poll=0.2),
        cluster=ClusterConfig(redis_url=cluster_url, node_id=name, internal_host="127.0.0.1",
                              internal_port=0, cluster_key=CLUSTER_KEY, ttl=1.5),
        acme=AcmeConfig(names=(DOMAIN,), directory=pebble.directory, ca_bundle=pebble.ca_bundle,
                        retry_first=1.0, order_timeout=20.0, sync_interval=1.0, lock_ttl=lock_ttl))
    Node.root_pem = pebble.root_pem
    return Node(config)


def test_one_node_orders_every_node_answers_and_serves(pebble: Pebble, tmp_path: Path,
                                                       redis_registry_url: str,
                                                       cluster_url: str) -> None:
    shared = redis.Redis.from_url(cluster_url)
    # As if B had died mid-order: A must wait; B, restarted, takes its lock back and orders.
    shared.set(LOCK, "B", px=60_000)
    b_port = free_port()
    a = start_node(pebble, tmp_path, "A", pebble.tls_port, redis_registry_url, cluster_url)
    b: Node | None = None
    try:
        time.sleep(0.5)
        assert not a.trusted() and a.state(lambda m: m.orders) == 0
        b = start_node(pebble, tmp_path, "B", b_port, redis_registry_url, cluster_url)
        wait_for(lambda: a.trusted() and b is not None and b.trusted(), "both certificates")
        assert a.served() == b.served()
        assert b.state(lambda m: m.ordered) == ["main"]
        assert a.state(lambda m: m.ordered) == []
        assert pebble.orders() == 1 and pebble.accounts() == 1  # one order, one account
        assert shared.zcard(REDIS_PREFIX + "orders") == 1  # (the cluster's order log)
        assert shared.get(LOCK) is None  # released after the order
        for node in "AB":  # nothing on disk: the cluster keeps it all in Redis
            assert not (tmp_path / node / "acme").exists()

        # A named entry: one node orders its certificate, both serve it.
        hub = Entry(uuid=f"acme-cluster-{time.monotonic_ns()}", base32=new_secret(), name="hub")
        a.call(a.registry.add(hub))
        wait_for(lambda: a.trusted(f"hub.{DOMAIN}") and b is not None
                 and b.trusted(f"hub.{DOMAIN}"), "both nodes' hub certificates")
        assert a.served(f"hub.{DOMAIN}") == b.served(f"hub.{DOMAIN}")
        ordered = a.state(lambda m: m.ordered) + b.state(lambda m: m.ordered)
        assert sorted(ordered) == [f"hub.{DOMAIN}", "main"]
        assert pebble.orders() == 2
        main, named = a.served(), a.served(f"hub.{DOMAIN}")
    finally:
        a.stop()
        if b is not None:
            b.stop()

    # Restarting orders nothing: Redis holds valid certificates.
    a = start_node(pebble, tmp_path, "A", pebble.tls_port, redis_registry_url, cluster_url)
    b = start_node(pebble, tmp_path, "B", b_port, redis_registry_url, cluster_url)
    try:
        for node in (a, b):
            assert node.served() == main
            wait_for(lambda node=node: node.trusted(f"hub.{DOMAIN}"),
                     "hub after the restart")
            assert node.served(f"hub.{DOMAIN}") == named
        time.sleep(1.0)
        assert a.state(lambda m: m.orders) == b.state(lambda m: m.orders) == 0
        assert pebble.orders() == 2

        # The name removed: both nodes drop its certificate, and so does Redis.
        a.call(a.registry.remove(hub.uuid))
        wait_for(lambda: not (a.trusted(f"hub.{DOMAIN}") or b.trusted(f"hub.{DOMAIN}")),
                 "hub's certificate dropped on both nodes")
        for node in (a, b):  # now the main certificate, unverified for that name
            assert fingerprint(node.port, f"hub.{DOMAIN}") == main
        wait_for(lambda: shared.exists(REDIS_PREFIX + f"cert:hub.{DOMAIN}") == 0,
                 "hub's certificate gone from Redis")
    finally:
        a.stop()
        b.stop()
        shared.close()


def test_a_lock_left_by_a_dead_node_expires(pebble: Pebble, tmp_path: Path,
                                            redis_registry_url: str, cluster_url: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    shared = redis.Redis.from_url(cluster_url)
    shared.set(LOCK, "gone", px=2_500)  # its holder died mid-order
    started = time.monotonic()
    # A lock shorter than the order: kept only because it is extended while the order runs.
    ttl = 0.6
    a = start_node(pebble, tmp_path, "A", pebble.tls_port, redis_registry_url, cluster_url,
                   lock_ttl=ttl)
    try:
        held: list[float] = []  # when A was seen holding the lock
        while not a.trusted() and time.monotonic() - started < 30:
            if shared.get(LOCK) == b"A":
                held.append(time.monotonic())
            time.sleep(0.05)
        assert a.trusted()
        assert time.monotonic() - started >= 2.5
        assert a.state(lambda m: m.ordered) == ["main"]
        assert "acme order lock lost" not in caplog.text
        assert held and held[-1] - held[0] > ttl  # held longer than one lifetime of the lock
        assert shared.get(LOCK) is None
    finally:
        a.stop()
        shared.close()


def test_the_lock_and_shared_challenges_in_redis(cluster_url: str) -> None:
    """The store's lock: one owner at a time, extended and released by its owner only, taken
    back by the same owner; challenges expire by themselves."""
    store = RedisStore(cluster_url, shown="test")
    try:
        assert store.acquire("A", 5) and not store.acquire("B", 5)
        assert store.acquire("A", 5)  # (a node restarted with its own ID)
        assert not store.refresh("B", 5) and store.refresh("A", 5)
        store.release("B")
        assert not store.acquire("B", 5)
        store.release("A")
        assert store.acquire("B", 0.2)
        time.sleep(0.3)
        assert store.acquire("A", 5)  # B's expired
        store.share_challenges({"tls-alpn-01:x.test": "00ff", "http-01:tok": "tok.key"}, ttl=0.3)
        assert store.challenges() == {"tls-alpn-01:x.test": "00ff", "http-01:tok": "tok.key"}
        time.sleep(0.4)
        assert store.challenges() == {}
        store.withdraw_challenges(["tls-alpn-01:x.test", "http-01:tok"])
    finally:
        store.close()
