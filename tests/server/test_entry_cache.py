"""The relay's in-memory registry entries (server/hub.py's EntryCache): a known ID's CONNECT
reads no registry, and no change is ever missed for it — writes by this process, commits by
another (SQLite, seen at the very next CONNECT), reports of the registry's watch."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ServerThread, recv_exactly, running_server
from revocation_support import POLL, connect_status, parked_entries, wait_until

from rendezvous.registry import Entry, Registry, open_registry
from rendezvous.registry.base import Changes
from rendezvous.server.hub import EntryCache

REFUSED = b"HTTP/1.1 401"
PARKED_LINE = b"HTTP/1.1 200"


class CountedReads:
    """Counts the reads of a real registry (its get() wrapped, nothing else changed)."""

    def __init__(self, registry: Registry) -> None:
        self.count = 0
        real = registry.get

        async def get(uuid: str) -> Entry | None:
            self.count += 1
            return await real(uuid)

        registry.get = get  # type: ignore[method-assign]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'registry.sqlite3'}"


@pytest.fixture
def server(tmp_path: Path, sqlite_url: str) -> Iterator[ServerThread]:
    with running_server(tmp_path, registry=open_registry(sqlite_url), settle=0.0,
                        registry_poll=POLL) as thread:
        hub = thread.server.hub
        assert hub is not None
        wait_until(lambda: hub.entries.following, 5.0)
        yield thread


def test_a_known_ids_connects_read_the_registry_once(server: ServerThread) -> None:
    entry = server.add_entry()
    reads = CountedReads(server.registry)
    for _ in range(5):
        assert connect_status(server, entry) == PARKED_LINE
    assert reads.count == 1


def test_another_process_commit_is_seen_by_the_very_next_connect(server: ServerThread,
                                                                 sqlite_url: str) -> None:
    """A rotation committed by another connection (the CLI's), before the watch has polled:
    the next CONNECT checks the new secret, not the kept one."""
    entry = server.add_entry()
    assert connect_status(server, entry) == PARKED_LINE  # now kept in memory
    rotated = entry.rotated()
    other = open_registry(sqlite_url)  # as `users rotate` in another process
    try:
        server.call(other.replace(rotated))
        assert connect_status(server, entry) == REFUSED
        assert connect_status(server, rotated) == PARKED_LINE
        server.call(other.remove(entry.uuid))
        assert connect_status(server, rotated) == REFUSED
    finally:
        server.call(other.close())


def test_this_process_writes_are_seen_at_once(server: ServerThread) -> None:
    """The admin page writes through the relay's own registry object: the write forgets the
    kept entry before it returns."""
    entry = server.add_entry()
    assert connect_status(server, entry) == PARKED_LINE
    rotated = entry.rotated()
    server.call(server.registry.replace(rotated))
    assert connect_status(server, entry) == REFUSED
    assert connect_status(server, rotated) == PARKED_LINE


def test_a_new_label_reaches_parked_connections_and_the_kept_entry(server: ServerThread) -> None:
    entry = server.add_entry()
    sock = server.park(entry)
    relabelled = dataclasses.replace(entry, label="renamed")
    server.call(server.registry.replace(relabelled))
    wait_until(lambda: parked_entries(server, entry.uuid) == [relabelled], 3.0)
    assert connect_status(server, relabelled) == PARKED_LINE
    hub = server.server.hub
    assert hub is not None
    assert server.sync(hub.entries.get, entry.uuid) == relabelled
    sock.close()


def test_no_cache_means_a_read_per_connect(tmp_path: Path, sqlite_url: str) -> None:
    with running_server(tmp_path, registry=open_registry(sqlite_url), settle=0.0,
                        entry_cache=0) as server:
        entry = server.add_entry()
        reads = CountedReads(server.registry)
        for _ in range(3):
            assert connect_status(server, entry) == PARKED_LINE
        assert reads.count == 3


def test_a_read_that_spans_a_change_is_not_kept() -> None:
    cache = EntryCache(10)
    entry = Entry(uuid="a", base32="A" * 32)
    cache.keep(entry, cache.generation)
    assert cache.get("a") is None  # not following the registry yet: nothing kept, nothing used
    cache.follow(True)
    before = cache.generation
    cache.forget("b")  # any change while "a" was being read
    cache.keep(entry, before)
    assert cache.get("a") is None
    cache.keep(entry, cache.generation)
    assert cache.get("a") == entry
    cache.changed(Changes(frozenset({"a"})))
    assert cache.get("a") is None
    cache.keep(entry, cache.generation)
    cache.changed(Changes(everything=True))
    assert len(cache) == 0
    cache.keep(entry, cache.generation)
    cache.follow(False)  # the watch failed: changes may be missed from now on
    assert cache.get("a") is None and len(cache) == 0


def test_the_cache_is_bounded() -> None:
    cache = EntryCache(3)
    cache.follow(True)
    for i in range(10):
        cache.keep(Entry(uuid=f"id-{i}", base32="A" * 32), cache.generation)
    assert len(cache) == 3
    assert [cache.get(f"id-{i}") is not None for i in range(10)] == [False] * 7 + [True] * 3


def test_unknown_ids_are_read_every_time(server: ServerThread) -> None:
    reads = CountedReads(server.registry)
    ghost = Entry(uuid="nobody", base32="A" * 32)
    for _ in range(3):
        with server.connect() as sock:
            sock.sendall(b"CONNECT uuid:nobody?response=123456 HTTP/1.1\r\n\r\n")
            assert recv_exactly(sock, 12) == REFUSED
    assert reads.count == 3
    hub = server.server.hub
    assert hub is not None
    assert server.sync(hub.entries.get, ghost.uuid) is None
