"""Revocation revokes: ``users rotate``/``remove``/``visitor`` in another process, under a running
relay, take effect within 2 s — old parked connections closed, the next visitor checked against
the current entry — for the SQLite and the Redis registry. (The admin page:
tests/admin/test_admin_revocation.py; cluster nodes: tests/cluster/test_cluster_revocation.py.)"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from harness import HiddenHTTPService, ServerThread, recv_exactly, running_server
from revocation_support import (
    POLL,
    REVOKED_WITHIN,
    closed_by_relay,
    connect_status,
    parked_entries,
    users,
    visit,
    wait_until,
)

from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry, open_registry
from rendezvous.server.revocation import READ_BATCH

PASSWORD = "open sesame"


@pytest.fixture(params=["sqlite", "redis"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    url: str = request.getfixturevalue("redis_registry_url")
    return url


@pytest.fixture
def server(tmp_path: Path, registry_url: str) -> Iterator[ServerThread]:
    with running_server(tmp_path, registry=open_registry(registry_url), pair_wait=0.3,
                        settle=0.0, registry_poll=POLL) as thread:
        yield thread


def test_rotate_closes_the_old_parked_connections(server: ServerThread, registry_url: str,
                                                  tmp_path: Path) -> None:
    old = server.add_entry()
    parked = [server.park(old) for _ in range(4)]
    start = time.monotonic()
    said = users(registry_url, tmp_path, "rotate", old.uuid, "--no-ca", "--out",
                 str(tmp_path / "p")).stdout
    # The operator is told what the running relay does about it.
    assert "a running relay closes the connections parked with the old secret" in said
    for sock in parked:
        assert closed_by_relay(sock, max(0.0, start + REVOKED_WITHIN - time.monotonic()))
        sock.close()
    assert server.parked(old.uuid) == 0
    # No visitor reaches the holder of the old secret, and it cannot park again.
    assert visit(server, old).status_code == 404
    assert connect_status(server, old) == b"HTTP/1.1 401"
    new = server.call(server.registry.get(old.uuid))
    assert new is not None and not new.same_secret(old)
    with HiddenHTTPService(server, new, parked=1) as service:
        answer = visit(server, new, path="/after-rotate")
        assert answer.status_code == 200 and answer.json()["path"] == "/after-rotate"
        assert service.pairings == 1


def test_remove_closes_every_parked_connection(server: ServerThread, registry_url: str,
                                               tmp_path: Path) -> None:
    entry = server.add_entry()
    other = server.add_entry()
    parked = [server.park(entry) for _ in range(4)]
    untouched = server.park(other)
    start = time.monotonic()
    said = users(registry_url, tmp_path, "remove", entry.uuid).stdout
    assert "a running relay closes the connections parked with the old secret" in said
    for sock in parked:
        assert closed_by_relay(sock, max(0.0, start + REVOKED_WITHIN - time.monotonic()))
        sock.close()
    assert visit(server, entry).status_code == 404
    assert connect_status(server, entry) == b"HTTP/1.1 401"
    # Another ID's parked connection stays.
    assert not closed_by_relay(untouched, 0.1)
    assert server.parked(other.uuid) == 1
    untouched.close()


def test_a_visitor_password_applies_to_the_very_next_visitor(
        server: ServerThread, registry_url: str, tmp_path: Path) -> None:
    entry = server.add_entry()
    with HiddenHTTPService(server, entry, parked=2) as service:
        assert visit(server, entry).status_code == 200
        users(registry_url, tmp_path, "visitor", entry.uuid, "--password", PASSWORD)
        # The connections parked before the change stay, and take the new entry on.
        seen = wait_until(lambda: all(e is not None and e.visitor is not None
                                      for e in parked_entries(server, entry.uuid)),
                          REVOKED_WITHIN)
        assert seen < REVOKED_WITHIN
        assert server.parked(entry.uuid) == 2
        pairings = service.pairings
        assert visit(server, entry, "x").status_code == 401
        assert service.pairings == pairings  # a 401 uses up no parked connection
        assert server.parked(entry.uuid) == 2
        assert visit(server, entry, PASSWORD).status_code == 200

        users(registry_url, tmp_path, "visitor", entry.uuid, "--off")
        wait_until(lambda: all(e is not None and e.visitor is None
                               for e in parked_entries(server, entry.uuid)), REVOKED_WITHIN)
        assert visit(server, entry, "anything").status_code == 200


def test_a_token_check_spanning_a_change_reads_the_entry_again(server: ServerThread) -> None:
    """A change noticed while a CONNECT's entry is being read sends the check back to the
    registry: it never parks with an entry older than one the relay has seen."""
    old = server.add_entry()
    new = old.rotated()
    hub = server.server.hub
    assert hub is not None
    registry = server.registry
    real_get = registry.get

    async def get_then_rotate(uuid: str) -> Entry | None:
        found = await real_get(uuid)  # the old entry: read just before the change ...
        registry.get = real_get  # type: ignore[method-assign]
        await registry.replace(new)  # ... which is noticed before the answer is used
        hub.registry_changes += 1
        return found

    registry.get = get_then_rotate  # type: ignore[method-assign]
    try:
        with server.connect() as sock:
            token = current_token(old.base32, old.step, old.digits)
            sock.sendall(f"CONNECT uuid:{old.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
            assert recv_exactly(sock, 12) == b"HTTP/1.1 401"
    finally:
        registry.get = real_get  # type: ignore[method-assign]
    with server.park(new):  # the new secret parks
        server.wait_parked(old.uuid, 1)


def test_unchanged_secret_keeps_parked_connections(server: ServerThread) -> None:
    """A change that keeps the secret (a new label) closes nothing."""
    entry = server.add_entry()
    sock = server.park(entry)
    relabelled = dataclasses.replace(entry, label="renamed", updated=time.time())
    server.call(server.registry.replace(relabelled))
    assert not closed_by_relay(sock, 3 * POLL)
    assert parked_entries(server, entry.uuid) == [relabelled]
    sock.close()


def test_a_dropped_subscription_misses_no_revocation(tmp_path: Path,
                                                     redis_registry_url: str) -> None:
    """Redis drops the relay's change subscription (CLIENT KILL) and the rotation is published
    while it is down: re-subscribed, the relay re-checks what it holds."""
    with running_server(tmp_path, registry=open_registry(redis_registry_url), pair_wait=0.3,
                        settle=0.0, registry_poll=POLL) as server:
        old = server.add_entry()
        parked = server.park(old)
        client = redis.Redis.from_url(redis_registry_url)
        try:
            assert client.client_kill_filter(_type="pubsub") == 1
        finally:
            client.close()
        start = time.monotonic()
        users(redis_registry_url, tmp_path, "rotate", old.uuid, "--no-ca", "--out",
              str(tmp_path / "p"))
        assert closed_by_relay(parked, max(0.0, start + REVOKED_WITHIN - time.monotonic()))
        parked.close()


def test_a_recheck_of_everything_covers_writers_that_do_not_announce(
        tmp_path: Path, redis_registry_url: str) -> None:
    """node-rendezvous or redis-cli delete entries without publishing; the next re-check of
    everything (here: after the subscription dropped) finds them all, more than one read batch
    of IDs."""
    count = READ_BATCH + 6
    with running_server(tmp_path, registry=open_registry(redis_registry_url), pair_wait=0.3,
                        settle=0.0, registry_poll=POLL) as server:
        entries = [server.add_entry() for _ in range(count)]
        parked = [server.park(entry) for entry in entries]
        kept = entries[0]  # one entry stays: its connection stays
        client = redis.Redis.from_url(redis_registry_url)
        try:
            assert client.delete(*(entry.uuid for entry in entries[1:])) == count - 1
            assert client.client_kill_filter(_type="pubsub") == 1
        finally:
            client.close()
        start = time.monotonic()
        for sock in parked[1:]:
            assert closed_by_relay(sock, max(0.0, start + REVOKED_WITHIN - time.monotonic()))
            sock.close()
        assert not closed_by_relay(parked[0], 0.1)
        assert server.parked(kept.uuid) == 1
        parked[0].close()
