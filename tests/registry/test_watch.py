"""``Registry.watch()``: every backend reports the IDs written, by this object at once and by
other connections and processes within the poll interval (SQLite) or at once (Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis
from support import free_port, stop_process, wait_for_port

from rendezvous.errors import RegistryError
from rendezvous.registry import Entry, Registry, new_secret, open_registry
from rendezvous.registry import redis as redis_backend
from rendezvous.registry.base import Changes
from rendezvous.registry.sqlite import CHANGES_KEPT

INTERVAL = 0.05  # poll interval of these watches
WAIT = 2.0  # a report due at once, or after one poll, comes well within this


@pytest.fixture(params=["memory", "sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    found: str = request.getfixturevalue("redis_registry_url")
    return found


@pytest.fixture
def shared_url(url: str) -> str:
    """Backends that other connections and processes can write to."""
    if url.startswith("memory:"):
        pytest.skip("a memory registry has no other writers")
    return url


def entry(uuid: str) -> Entry:
    return Entry(uuid=uuid, base32=new_secret())


async def next_report(watch: AsyncIterator[Changes]) -> Changes:
    return await asyncio.wait_for(watch.__anext__(), WAIT)


async def reported(watch: AsyncIterator[Changes], uuid: str) -> Changes:
    """The first report that names ``uuid`` (a backend may report others, or everything)."""
    deadline = time.monotonic() + WAIT
    while True:
        changes = await asyncio.wait_for(watch.__anext__(), max(0.01, deadline - time.monotonic()))
        if uuid in changes.ids:
            return changes


def run(url: str, body: Callable[[Registry, AsyncIterator[Changes]], Awaitable[None]]) -> None:
    """Open the registry at ``url`` and a watch of it, run ``body``, close both."""

    async def main() -> None:
        registry = open_registry(url)
        watch = registry.watch(INTERVAL)
        try:
            assert await next_report(watch) == Changes(everything=True)  # following from now
            await body(registry, watch)
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
            await registry.close()

    asyncio.run(main())


def test_own_writes_are_reported_at_once(url: str) -> None:
    async def body(registry: Registry, watch: AsyncIterator[Changes]) -> None:
        first = entry("own-1")
        await registry.add(first)
        assert (await reported(watch, "own-1")).everything is False
        await registry.replace(first.rotated())
        await reported(watch, "own-1")
        await registry.remove("own-1")
        await reported(watch, "own-1")

    run(url, body)


def test_another_connections_writes_are_reported(shared_url: str) -> None:
    async def body(registry: Registry, watch: AsyncIterator[Changes]) -> None:
        other = open_registry(shared_url)
        try:
            for uuid in ("a", "b"):
                await other.add(entry(uuid))
            changes = await reported(watch, "a")
            if "b" not in changes.ids:
                await reported(watch, "b")
            start = time.monotonic()
            await other.replace(dataclasses.replace(entry("a"), label="rotated"))
            await reported(watch, "a")
            await other.remove("b")
            await reported(watch, "b")
            assert time.monotonic() - start < 1.0  # within a few polls, not a recheck
        finally:
            await other.close()

    run(shared_url, body)


def test_sqlite_reports_writers_that_know_nothing_of_it(tmp_path: Path) -> None:
    """The change log is kept by triggers: plain SQL from any program is reported too."""
    path = tmp_path / "registry.sqlite3"

    async def body(registry: Registry, watch: AsyncIterator[Changes]) -> None:
        await registry.add(entry("by-hand"))
        await reported(watch, "by-hand")
        conn = sqlite3.connect(path)
        try:
            with conn:
                conn.execute("UPDATE entries SET base32 = 'AAAA' WHERE uuid = 'by-hand'")
        finally:
            conn.close()
        await reported(watch, "by-hand")

    run(f"sqlite:///{path}", body)


def test_sqlite_reports_everything_when_its_log_ran_past_the_watch(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    url = f"sqlite:///{path}"

    async def body(registry: Registry, watch: AsyncIterator[Changes]) -> None:
        await registry.add(entry("busy"))
        await reported(watch, "busy")
        # More writes than the log keeps, in one transaction of another connection: by the
        # next poll, the oldest of them are gone from the log.
        conn = sqlite3.connect(path)
        try:
            with conn:
                for n in range(CHANGES_KEPT + 5):
                    conn.execute("UPDATE entries SET label = ? WHERE uuid = 'busy'", (str(n),))
            kept = conn.execute("SELECT count(*) FROM changes").fetchone()[0]
        finally:
            conn.close()
        assert kept == CHANGES_KEPT
        changes = await next_report(watch)
        assert changes.everything and "busy" in changes.ids

    run(url, body)


def test_redis_announces_on_a_channel_per_database(redis_url: str) -> None:
    """Pub/sub ignores database numbers; a registry in another database is not reported."""
    here = redis_url.rsplit("/", 1)[0] + "/3"
    elsewhere = redis_url.rsplit("/", 1)[0] + "/4"
    for db in (here, elsewhere):
        redis.Redis.from_url(db).flushdb()

    async def body(registry: Registry, watch: AsyncIterator[Changes]) -> None:
        other = open_registry(elsewhere)
        try:
            await other.add(entry("elsewhere"))
            await registry.add(entry("here"))
            changes = await reported(watch, "here")
            assert "elsewhere" not in changes.ids
        finally:
            await other.close()

    run(here, body)


def test_redis_reports_everything_after_its_subscription_dropped(redis_registry_url: str) -> None:
    """redis-py re-subscribes by itself after a drop; what was published meanwhile is lost, so
    the watch says anything may have changed."""

    async def body(registry: Registry, watch: AsyncIterator[Changes]) -> None:
        client = redis.Redis.from_url(redis_registry_url)
        try:
            assert client.client_kill_filter(_type="pubsub") >= 1
        finally:
            client.close()
        await registry.add(entry("during-the-drop"))
        changes = await next_report(watch)
        assert changes.everything
        await registry.add(entry("after"))
        await reported(watch, "after")

    run(redis_registry_url, body)


def test_redis_rechecks_for_writers_that_do_not_announce(
        redis_registry_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """node-rendezvous and redis-cli write without publishing: a periodic "everything" (and a
    ping of the subscription) covers them."""
    monkeypatch.setattr(redis_backend, "RECHECK_INTERVAL", 0.2)

    async def body(registry: Registry, watch: AsyncIterator[Changes]) -> None:
        start = time.monotonic()
        for _ in range(3):  # pings are answered: the watch goes on
            assert (await next_report(watch)).everything
        assert time.monotonic() - start >= 0.4

    run(redis_registry_url, body)


def test_a_stuck_redis_ends_the_watch_with_a_registry_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that stops answering (SIGSTOP) leaves the subscription open but silent: the
    unanswered ping ends the watch, so the relay knows it is no longer told of changes."""
    monkeypatch.setattr(redis_backend, "RECHECK_INTERVAL", 0.2)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 10, proc)

        async def body(registry: Registry, watch: AsyncIterator[Changes]) -> None:
            proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(RegistryError, match="no answer"):
                    for _ in range(5):
                        await next_report(watch)
            finally:
                proc.send_signal(signal.SIGCONT)

        run(f"redis://127.0.0.1:{port}/0", body)
    finally:
        stop_process(proc)
