"""The redis backend reads node-rendezvous's data and shares its database with others' data."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from support import free_port

from rendezvous.errors import RegistryError
from rendezvous.registry import Entry
from rendezvous.registry.redis import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    NAME_PREFIX,
    RedisRegistry,
    redacted,
)

ORIGINAL_ID = "2f402f80-da50-11e1-9b23-000000000001"
# Exactly what node-rendezvous's registrar stored for a hidden server.
ORIGINAL_VALUE = '{"authParams":{"base32":"JBSWY3DPEHPK3PXP","step":30}}'


@pytest.fixture
def raw(redis_registry_url: str) -> Iterator[redis.Redis]:
    """A plain client on the emptied test database, to write as another program would."""
    client = redis.Redis.from_url(redis_registry_url)
    try:
        yield client
    finally:
        client.close()


def test_reads_an_entry_written_by_the_original(redis_registry_url: str, raw: redis.Redis) -> None:
    raw.set(ORIGINAL_ID, ORIGINAL_VALUE)
    expected = Entry(
        uuid=ORIGINAL_ID,
        base32="JBSWY3DPEHPK3PXP",
        step=30,
        digits=6,
        label="",
        created=0.0,
        updated=0.0,
    )

    async def main() -> None:
        registry = RedisRegistry(redis_registry_url)
        try:
            assert await registry.get(ORIGINAL_ID) == expected
            assert await registry.list() == [expected]
        finally:
            await registry.close()

    asyncio.run(main())


def test_original_entries_sort_before_ours_and_unknown_fields_are_ignored(
    redis_registry_url: str, raw: redis.Redis
) -> None:
    raw.set("old", json.dumps({"authParams": {"base32": "AAAA", "step": 60}, "owner": "x"}))

    async def main() -> None:
        registry = RedisRegistry(redis_registry_url)
        try:
            await registry.add(Entry(uuid="new", base32="BBBB"))
            assert [e.uuid for e in await registry.list()] == ["old", "new"]
            old = await registry.get("old")
            assert old is not None
            assert (old.base32, old.step, old.digits, old.created) == ("AAAA", 60, 6, 0.0)
        finally:
            await registry.close()

    asyncio.run(main())


def test_writes_the_original_layout(redis_registry_url: str, raw: redis.Redis) -> None:
    entry = Entry(uuid=ORIGINAL_ID, base32="JBSWY3DPEHPK3PXP", label="hub")

    async def main() -> None:
        registry = RedisRegistry(redis_registry_url)
        try:
            await registry.add(entry)
        finally:
            await registry.close()

    asyncio.run(main())
    value = raw.get(ORIGINAL_ID)
    assert isinstance(value, bytes)
    record = json.loads(value)
    assert record["authParams"] == {"base32": "JBSWY3DPEHPK3PXP", "step": 30, "digits": 6}
    assert record["label"] == "hub"
    assert record["uuid"] == ORIGINAL_ID


def test_the_proxy_option_is_ours_and_an_unknown_value_means_none(
    redis_registry_url: str, raw: redis.Redis
) -> None:
    raw.set(ORIGINAL_ID, ORIGINAL_VALUE)
    for key, value in (("text", "2"), ("three", 3), ("true", True), ("null", None)):
        raw.set(key, json.dumps({"authParams": {"base32": "AAAA"}, "proxyProtocol": value}))

    async def main() -> None:
        registry = RedisRegistry(redis_registry_url)
        try:
            await registry.add(Entry(uuid="ours", base32="BBBB", proxy_protocol=2))
            found = {e.uuid: e.proxy_protocol for e in await registry.list()}
            assert found == {ORIGINAL_ID: 0, "text": 0, "three": 0, "true": 0, "null": 0,
                             "ours": 2}
        finally:
            await registry.close()

    asyncio.run(main())
    value = raw.get("ours")
    assert isinstance(value, bytes)
    assert json.loads(value)["proxyProtocol"] == 2
    # The original's record stays as it was: nothing is added to entries we only read.
    assert raw.get(ORIGINAL_ID) == ORIGINAL_VALUE.encode()


def test_an_own_relay_address_is_ours_and_a_bad_one_means_none(
    redis_registry_url: str, raw: redis.Redis
) -> None:
    raw.set(ORIGINAL_ID, ORIGINAL_VALUE)
    for key, server in (("text", "relay.example.com"), ("blank", {"host": ""}),
                        ("spaced", {"host": "a b"}), ("port", {"port": "443"}),
                        ("huge", {"port": 65536}), ("list", [1])):
        raw.set(key, json.dumps({"authParams": {"base32": "AAAA"}, "server": server}))

    async def main() -> None:
        registry = RedisRegistry(redis_registry_url)
        try:
            await registry.add(Entry(uuid="ours", base32="BBBB", server_host="relay.example.com"))
            found = {e.uuid: (e.server_host, e.server_port) for e in await registry.list()}
            assert found == {key: ("", 0) for key in
                             (ORIGINAL_ID, "text", "blank", "spaced", "port", "huge", "list")} | {
                "ours": ("relay.example.com", 0)}
            # The original's entry rotated by us: our layout, still no address of its own.
            original = await registry.get(ORIGINAL_ID)
            assert original is not None
            await registry.replace(original.rotated())
            rotated = await registry.get(ORIGINAL_ID)
            assert rotated is not None and (rotated.server_host, rotated.server_port) == ("", 0)
        finally:
            await registry.close()

    asyncio.run(main())
    value = raw.get("ours")
    assert isinstance(value, bytes)
    assert json.loads(value)["server"] == {"host": "relay.example.com"}
    rotated_value = raw.get(ORIGINAL_ID)
    assert isinstance(rotated_value, bytes) and "server" not in json.loads(rotated_value)


def test_other_data_is_skipped(redis_registry_url: str, raw: redis.Redis) -> None:
    raw.set(ORIGINAL_ID, ORIGINAL_VALUE)
    junk: dict[str, str | bytes] = {
        "not-json": "hello",
        "json-list": "[1, 2, 3]",
        "json-number": "42",
        "no-auth-params": '{"foo": 1}',
        "auth-params-not-object": '{"authParams": "JBSWY3DPEHPK3PXP"}',
        "no-base32": '{"authParams": {"step": 30}}',
        "base32-not-string": '{"authParams": {"base32": 12345}}',
        "bad-step": '{"authParams": {"base32": "AAAA", "step": "often"}}',
        "binary": b"\x00\xff\xfe",
    }
    for key, value in junk.items():
        raw.set(key, value)
    # A valid-looking record under a key that is not UTF-8 cannot be an ID.
    raw.set(b"\xff\xfe-key", ORIGINAL_VALUE)
    # Keys holding other types: MGET answers nil for them, GET answers WRONGTYPE.
    raw.hset("a-hash", "authParams", "x")
    raw.rpush("a-list", ORIGINAL_VALUE)
    raw.sadd("a-set", ORIGINAL_VALUE)

    async def main() -> None:
        registry = RedisRegistry(redis_registry_url)
        try:
            assert [e.uuid for e in await registry.list()] == [ORIGINAL_ID]
            for key in [*junk, "a-hash", "a-list", "a-set"]:
                assert await registry.get(key) is None, key
        finally:
            await registry.close()

    asyncio.run(main())


def test_unreachable_redis_fails_quickly_and_clearly() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def main() -> None:
        registry = RedisRegistry(url)
        try:
            with pytest.raises(RegistryError, match="unreachable") as info:
                await registry.ping()
            assert url in str(info.value)
            with pytest.raises(RegistryError, match="unreachable"):
                await registry.get(ORIGINAL_ID)
            with pytest.raises(RegistryError, match="unreachable"):
                await registry.list()
        finally:
            await registry.close()

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < CONNECT_TIMEOUT


def test_a_stuck_redis_fails_within_the_command_timeout() -> None:
    # Accepts connections (the kernel does, from the backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def main() -> None:
            registry = RedisRegistry(url)
            try:
                with pytest.raises(RegistryError, match="unreachable"):
                    await registry.get(ORIGINAL_ID)
            finally:
                await registry.close()

        started = time.monotonic()
        asyncio.run(main())
        assert time.monotonic() - started < COMMAND_TIMEOUT + 1.5


def test_survives_dropped_connections(redis_registry_url: str, raw: redis.Redis) -> None:
    """A Redis restart leaves stale sockets in the pool; the next call must still succeed."""
    raw.set(ORIGINAL_ID, ORIGINAL_VALUE)

    async def main() -> None:
        registry = RedisRegistry(redis_registry_url)
        try:
            assert await registry.get(ORIGINAL_ID) is not None
            killed = raw.client_kill_filter(_type="normal", skipme=True)
            assert killed >= 1
            assert await registry.get(ORIGINAL_ID) is not None
        finally:
            await registry.close()

    asyncio.run(main())


def test_errors_do_not_show_the_password() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"

    async def main() -> None:
        registry = RedisRegistry(url)
        try:
            with pytest.raises(RegistryError) as info:
                await registry.ping()
            assert "s3cret" not in str(info.value)
            assert "127.0.0.1" in str(info.value)
        finally:
            await registry.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@host:6379/1", "redis://:***@host:6379/1"),
        ("rediss://user:pw@host/0", "rediss://user:***@host/0"),
        ("redis://user:pw@[::1]:6380/0", "redis://user:***@[::1]:6380/0"),
    ],
)
def test_redacted(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_names_live_in_the_registry_and_a_stale_mapping_is_free(
    redis_registry_url: str, raw: redis.Redis
) -> None:
    raw.set(ORIGINAL_ID, ORIGINAL_VALUE)

    async def main() -> None:
        registry = RedisRegistry(redis_registry_url)
        try:
            entry = await registry.get(ORIGINAL_ID)
            assert entry is not None and entry.name == ""
            await registry.replace(replace(entry, name="hub"))
            assert raw.get(NAME_PREFIX + "hub") == ORIGINAL_ID.encode()
            assert json.loads(raw.get(ORIGINAL_ID) or b"")["name"] == "hub"
            # The original's tools delete the entry's key alone: the mapping left is stale.
            raw.delete(ORIGINAL_ID)
            assert await registry.by_name("hub") is None
            await registry.add(Entry(uuid="new", base32="AAAA", name="hub"))
            found = await registry.by_name("hub")
            assert found is not None and found.uuid == "new"
            assert await registry.list() == [found]  # the mapping key is not an entry
        finally:
            await registry.close()

    asyncio.run(main())
