"""One contract, every registry backend: what the relay and the CLI may rely on."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from support import free_port

from rendezvous.errors import (
    ConfigError,
    DuplicateEntry,
    DuplicateName,
    RegistryError,
    UnknownEntry,
)
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.registry import Entry, Registry, new_secret, open_registry
from rendezvous.registry.base import normal_name
from rendezvous.registry.memory import MemoryRegistry
from rendezvous.registry.redis import RedisRegistry
from rendezvous.registry.sqlite import SQLiteRegistry

BACKENDS: dict[str, type[Registry]] = {
    "memory": MemoryRegistry,
    "sqlite": SQLiteRegistry,
    "redis": RedisRegistry,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(backend name, an empty registry URL for it)."""
    name: str = request.param
    if name == "memory":
        return name, "memory://"
    if name == "sqlite":
        return name, f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    # Only the redis case starts redis-server, so the others run without it.
    url: str = request.getfixturevalue("redis_registry_url")
    return name, url


@pytest.fixture
def url(backend: tuple[str, str]) -> str:
    """An empty registry URL, once per backend."""
    return backend[1]


def run(url: str, body: Callable[[Registry], Awaitable[None]]) -> None:
    """Open the registry at ``url``, run ``body`` on it in a fresh event loop, and close it."""

    async def main() -> None:
        registry = open_registry(url)
        try:
            await body(registry)
        finally:
            await registry.close()

    asyncio.run(main())


def make_entry(
    uuid: str, created: float = 1_700_000_000.25, label: str = "", step: int = 30, digits: int = 6
) -> Entry:
    """An entry with fixed timestamps, so equality checks are exact."""
    return Entry(
        uuid=uuid,
        base32=new_secret(),
        step=step,
        digits=digits,
        label=label,
        created=created,
        updated=created,
    )


def test_open_registry_picks_backend(backend: tuple[str, str]) -> None:
    name, url = backend

    async def body(registry: Registry) -> None:
        assert type(registry) is BACKENDS[name]
        assert registry.url == url

    run(url, body)


def test_open_registry_rejects_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match="ftp://"):
        open_registry("ftp://example.com/registry")


def test_ping(url: str) -> None:
    async def body(registry: Registry) -> None:
        assert await registry.ping() is None

    run(url, body)


@pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)
def test_ping_reports_an_unreachable_backend(backend: tuple[str, str], tmp_path: Path) -> None:
    """What /readyz and the relay's start rely on: ping fails, with RegistryError, when the
    backend cannot be reached (a SQLite file whose folder cannot exist, a Redis nobody runs)."""
    name, _ = backend
    if name == "sqlite":
        (tmp_path / "a-file").write_text("")
        url = f"sqlite:///{tmp_path / 'a-file' / 'registry.sqlite3'}"
    else:
        url = f"redis://127.0.0.1:{free_port()}/0"

    async def body(registry: Registry) -> None:
        with pytest.raises(RegistryError):
            await registry.ping()

    run(url, body)


def test_empty(url: str) -> None:
    async def body(registry: Registry) -> None:
        assert await registry.get("2f402f80-da50-11e1-9b23-000000000001") is None
        assert await registry.list() == []

    run(url, body)


def test_round_trip_of_every_field(url: str) -> None:
    entry = Entry(
        uuid="2f402f80-da50-11e1-9b23-000000000001",
        base32="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
        step=60,
        digits=8,
        label="living-room hub — étage 2",
        created=1_700_000_000.123456,
        updated=1_700_000_123.654321,
        visitor=VisitorSecret.from_password("2f402f80-da50-11e1-9b23-000000000001", "pw"),
        proxy_protocol=2,
        server_host="relay.example.com",
        server_port=443,
    )

    async def body(registry: Registry) -> None:
        await registry.add(entry)
        assert await registry.get(entry.uuid) == entry
        assert await registry.list() == [entry]

    run(url, body)


def test_an_entrys_own_relay_address_is_kept_by_a_rotation(url: str) -> None:
    entry = replace(make_entry("hub"), server_host="hub-relay.example.com")

    async def body(registry: Registry) -> None:
        await registry.add(entry)
        await registry.replace(entry.rotated())
        got = await registry.get("hub")
        assert got is not None and (got.server_host, got.server_port) == (
            "hub-relay.example.com", 0)
        await registry.replace(replace(got, server_port=8443))
        got = await registry.get("hub")
        assert got is not None and got.server_port == 8443
        assert got.server_host == "hub-relay.example.com"

    run(url, body)


def test_the_proxy_option_is_kept_by_a_rotation_and_can_be_changed(url: str) -> None:
    entry = replace(make_entry("hub"), proxy_protocol=1)

    async def body(registry: Registry) -> None:
        await registry.add(entry)
        rotated = entry.rotated()
        await registry.replace(rotated)
        got = await registry.get("hub")
        assert got is not None and got.proxy_protocol == 1 and got.base32 == rotated.base32
        for version in (2, 0):
            await registry.replace(replace(rotated, proxy_protocol=version))
            got = await registry.get("hub")
            assert got is not None and got.proxy_protocol == version

    run(url, body)


def test_defaults_round_trip(url: str) -> None:
    entry = Entry(uuid="plain", base32=new_secret())

    async def body(registry: Registry) -> None:
        await registry.add(entry)
        got = await registry.get("plain")
        assert got == entry
        assert (got.step, got.digits, got.label) == (30, 6, "")

    run(url, body)


def test_get_is_exact(url: str) -> None:
    async def body(registry: Registry) -> None:
        await registry.add(make_entry("abc"))
        assert await registry.get("ABC") is None
        assert await registry.get("ab") is None
        assert await registry.get("abc ") is None

    run(url, body)


def test_list_is_oldest_first(url: str) -> None:
    # Added out of order, and with IDs whose sort order differs from their age.
    middle = make_entry("a-middle", created=2000.0)
    newest = make_entry("b-newest", created=3000.0)
    oldest = make_entry("c-oldest", created=1000.0)

    async def body(registry: Registry) -> None:
        for entry in (middle, newest, oldest):
            await registry.add(entry)
        assert await registry.list() == [oldest, middle, newest]

    run(url, body)


def test_add_duplicate_fails_and_keeps_the_first(url: str) -> None:
    first = make_entry("dup", label="first")
    second = make_entry("dup", label="second")

    async def body(registry: Registry) -> None:
        await registry.add(first)
        with pytest.raises(DuplicateEntry) as info:
            await registry.add(second)
        assert info.value.uuid == "dup"
        assert isinstance(info.value, RegistryError)
        assert await registry.get("dup") == first
        assert await registry.list() == [first]

    run(url, body)


def test_rotation_replaces_the_secret(url: str) -> None:
    entry = make_entry("rotating", label="hub", step=30, digits=6)

    async def body(registry: Registry) -> None:
        await registry.add(entry)
        rotated = entry.rotated()
        assert rotated.base32 != entry.base32
        assert rotated.updated > entry.updated
        await registry.replace(rotated)
        got = await registry.get("rotating")
        assert got == rotated
        assert (got.created, got.label) == (entry.created, "hub")
        assert await registry.list() == [rotated]

    run(url, body)


def test_replace_unknown_fails_and_creates_nothing(url: str) -> None:
    async def body(registry: Registry) -> None:
        with pytest.raises(UnknownEntry) as info:
            await registry.replace(make_entry("ghost"))
        assert info.value.uuid == "ghost"
        assert isinstance(info.value, RegistryError)
        assert await registry.get("ghost") is None
        assert await registry.list() == []

    run(url, body)


def test_remove(url: str) -> None:
    keep = make_entry("keep", created=1.0)
    drop = make_entry("drop", created=2.0)

    async def body(registry: Registry) -> None:
        await registry.add(keep)
        await registry.add(drop)
        await registry.remove("drop")
        assert await registry.get("drop") is None
        assert await registry.list() == [keep]
        # The ID is free again.
        await registry.add(drop)
        assert await registry.get("drop") == drop

    run(url, body)


def test_remove_unknown_fails(url: str) -> None:
    async def body(registry: Registry) -> None:
        await registry.add(make_entry("other"))
        with pytest.raises(UnknownEntry) as info:
            await registry.remove("ghost")
        assert info.value.uuid == "ghost"
        assert len(await registry.list()) == 1

    run(url, body)


def test_many_entries(url: str) -> None:
    # More than one SCAN/MGET batch in the redis backend.
    entries = [make_entry(f"id-{i:04d}", created=float(i)) for i in range(1200)]

    async def body(registry: Registry) -> None:
        for entry in entries:
            await registry.add(entry)
        assert await registry.list() == entries

    run(url, body)


def test_changes_are_seen_at_once_by_another_handle(backend: tuple[str, str]) -> None:
    name, url = backend
    if name == "memory":
        pytest.skip("a memory registry is private to its object")

    async def main() -> None:
        server, operator = open_registry(url), open_registry(url)
        try:
            assert await server.get("shared") is None
            entry = make_entry("shared")
            await operator.add(entry)
            assert await server.get("shared") == entry
            rotated = entry.rotated()
            await operator.replace(rotated)
            assert await server.get("shared") == rotated
            await operator.remove("shared")
            assert await server.get("shared") is None
            assert await server.list() == []
        finally:
            await server.close()
            await operator.close()

    asyncio.run(main())


def open_descriptors() -> dict[int, str]:
    """This process's open file descriptors, each with what it points at."""
    found: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor os.listdir itself used is gone
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


# The memory backend holds nothing to release.
@pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)
def test_close_releases_the_backend(url: str) -> None:
    """Every descriptor the registry opened (SQLite's file and WAL, Redis's sockets) is closed by
    close(): a relay that reopens its registry, or a test run of hundreds, must not leak them."""

    async def main() -> None:
        before = open_descriptors()
        registry = open_registry(url)
        await registry.ping()
        await registry.add(make_entry("2f402f80-da50-11e1-9b23-000000000001"))
        assert await registry.list()
        held = {fd: target for fd, target in open_descriptors().items()
                if before.get(fd) != target}
        assert held, "an open registry holds no descriptor, so this test would prove nothing"
        await registry.close()
        after = open_descriptors()
        assert {fd: t for fd, t in held.items() if after.get(fd) == t} == {}

    asyncio.run(main())


# ---------------------------------------------------------------------------- names


def test_a_name_round_trips_and_finds_its_entry(url: str) -> None:
    hub = replace(make_entry("id-hub"), name="hub")
    plain = make_entry("id-plain", created=1_700_000_001.0)

    async def body(registry: Registry) -> None:
        await registry.add(hub)
        await registry.add(plain)
        assert await registry.get("id-hub") == hub
        assert await registry.by_name("hub") == hub
        assert await registry.by_name("id-hub") is None  # an ID is not a name
        assert await registry.by_name("other") is None
        assert await registry.by_name("") is None  # unnamed entries are not found by ""
        assert await registry.list() == [hub, plain]

    run(url, body)


def test_names_are_unique(url: str) -> None:
    first = replace(make_entry("one"), name="hub")
    second = replace(make_entry("two", created=1_700_000_001.0), name="hub")

    async def body(registry: Registry) -> None:
        await registry.add(first)
        with pytest.raises(DuplicateName, match="'hub'"):
            await registry.add(second)
        assert await registry.get("two") is None  # nothing half-added
        await registry.add(replace(second, name=""))
        with pytest.raises(DuplicateName):
            await registry.replace(second)  # a rename onto a taken name
        assert (await registry.get("two")) == replace(second, name="")
        assert await registry.by_name("hub") == first
        # An entry keeps its own name through a rotation.
        rotated = first.rotated()
        await registry.replace(rotated)
        assert await registry.by_name("hub") == rotated

    run(url, body)


def test_a_rename_frees_the_old_name_and_a_removal_frees_the_name(url: str) -> None:
    entry = replace(make_entry("one"), name="old")
    other = make_entry("two", created=1_700_000_001.0)

    async def body(registry: Registry) -> None:
        await registry.add(entry)
        renamed = replace(entry, name="new")
        await registry.replace(renamed)
        assert await registry.by_name("old") is None
        assert await registry.by_name("new") == renamed
        await registry.add(replace(other, name="old"))  # the old name is free again
        assert await registry.by_name("old") == replace(other, name="old")
        cleared = replace(renamed, name="")
        await registry.replace(cleared)
        assert await registry.by_name("new") is None
        await registry.replace(replace(cleared, name="new"))
        await registry.remove("one")
        assert await registry.by_name("new") is None
        await registry.add(replace(make_entry("three"), name="new"))
        found = await registry.by_name("new")
        assert found is not None and found.uuid == "three"

    run(url, body)


def test_a_name_is_found_at_once_by_another_handle(backend: tuple[str, str]) -> None:
    kind, url = backend
    if kind == "memory":
        pytest.skip("a memory registry is private to its object")

    async def main() -> None:
        server, operator = open_registry(url), open_registry(url)
        try:
            entry = replace(make_entry("shared"), name="hub")
            await operator.add(entry)
            assert await server.by_name("hub") == entry
            await operator.replace(replace(entry, name="hub2"))
            assert await server.by_name("hub") is None
            await operator.remove("shared")
            assert await server.by_name("hub2") is None
        finally:
            await server.close()
            await operator.close()

    asyncio.run(main())


@pytest.mark.parametrize("given, kept", [("hub", "hub"), ("Hub-2", "hub-2"), (" x ", "x"),
                                         ("", ""), ("a" * 63, "a" * 63)])
def test_normal_name(given: str, kept: str) -> None:
    assert normal_name(given) == kept


@pytest.mark.parametrize("bad", ["-hub", "hub-", "h_b", "h.b", "a" * 64, "hüb", "h b"])
def test_a_name_that_is_not_one_dns_label_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="one DNS label"):
        normal_name(bad)
