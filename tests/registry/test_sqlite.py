"""The sqlite backend: a file shared live with the CLI, created on demand, failing clearly."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rendezvous.errors import ConfigError, DuplicateName, RegistryError
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.registry import Entry
from rendezvous.registry.base import Changes
from rendezvous.registry.sqlite import SQLiteRegistry, path_from_url


def url_for(path: Path) -> str:
    return f"sqlite://{path}"


def test_another_process_sees_changes_at_once(tmp_path: Path) -> None:
    """The server keeps its registry open while ``rendezvous users`` edits the file."""
    db = tmp_path / "registry.sqlite3"
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from rendezvous.registry import Entry
        from rendezvous.registry.sqlite import SQLiteRegistry

        async def main():
            registry = SQLiteRegistry({url_for(db)!r})
            try:
                if sys.argv[1] == "add":
                    await registry.add(Entry(uuid="hub", base32="AAAA", label="from the CLI"))
                else:
                    await registry.remove("hub")
            finally:
                await registry.close()

        asyncio.run(main())
        """
    )

    def cli(action: str) -> None:
        subprocess.run([sys.executable, "-c", script, action], check=True, timeout=60)

    async def main() -> None:
        server = SQLiteRegistry(url_for(db))
        try:
            assert await server.get("hub") is None
            await asyncio.to_thread(cli, "add")
            entry = await server.get("hub")
            assert entry is not None
            assert entry.label == "from the CLI"
            assert [e.uuid for e in await server.list()] == ["hub"]
            await asyncio.to_thread(cli, "remove")
            assert await server.get("hub") is None
        finally:
            await server.close()

    asyncio.run(main())


def test_rotation_by_a_second_handle_is_seen_at_once(tmp_path: Path) -> None:
    url = url_for(tmp_path / "registry.sqlite3")
    entry = Entry(uuid="hub", base32="AAAA")

    async def main() -> None:
        server, operator = SQLiteRegistry(url), SQLiteRegistry(url)
        try:
            await server.add(entry)
            assert await server.get("hub") == entry
            rotated = entry.rotated()
            await operator.replace(rotated)
            assert await server.get("hub") == rotated
        finally:
            await server.close()
            await operator.close()

    asyncio.run(main())


def test_fresh_sees_every_commit_and_asks_sqlite_only_after_one(tmp_path: Path) -> None:
    """fresh() (the entry cache's check before each use) says False from the moment another
    connection commits, however it writes (our code, the sqlite3 shell, a checkpoint that
    resets the WAL), and True again once the watch has read the change. While nothing is
    committed it answers from the WAL index's header, without a PRAGMA."""
    db = tmp_path / "registry.sqlite3"

    async def main() -> None:
        relay, operator = SQLiteRegistry(url_for(db)), SQLiteRegistry(url_for(db))
        shell = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        reports: asyncio.Queue[Changes] = asyncio.Queue()

        async def follow() -> None:  # as the relay's entry cache follows its registry
            async for changes in relay.watch(3600):  # (woken by hand below, not by time)
                reports.put_nowait(changes)

        watching = asyncio.get_running_loop().create_task(follow())
        queries: list[str] = []
        real_query = relay._query

        def counted(action: str, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
            queries.append(sql)
            return real_query(action, sql, params)

        relay._query = counted  # type: ignore[method-assign]
        try:
            await reports.get()
            assert relay.fresh()
            queries.clear()
            assert relay.fresh() and relay.fresh()
            assert queries == []  # answered from the header
            writes: list[Callable[[], object]] = [
                lambda: asyncio.run(operator.add(Entry(uuid="a", base32="AAAA"))),
                lambda: shell.execute("UPDATE entries SET label = 'x'"),
                lambda: shell.execute("PRAGMA wal_checkpoint(TRUNCATE)"),
                lambda: asyncio.run(operator.remove("a")),
            ]
            for write in writes:
                await asyncio.to_thread(write)  # (another thread: as another process would)
                version_moved = relay._query("poll", "PRAGMA data_version")[0][0] != (
                    relay._watched_version)
                assert relay.fresh() is not version_moved
                if version_moved:
                    assert not relay.fresh()  # (until the watch catches up)
                    relay._changed("-")  # wake the watch: it polls at once
                    await asyncio.wait_for(reports.get(), 5)
                assert relay.fresh()
            await relay.add(Entry(uuid="b", base32="AAAA"))  # its own write: nothing to watch
            assert relay.fresh()
        finally:
            watching.cancel()
            shell.close()
            await relay.close()
            await operator.close()
        assert not relay.fresh()

    asyncio.run(main())


def test_creates_folders_and_uses_wal(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "registry.sqlite3"

    async def main() -> None:
        registry = SQLiteRegistry(url_for(db))
        try:
            await registry.ping()
        finally:
            await registry.close()

    asyncio.run(main())
    assert db.is_file()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(entries)")]
        assert columns == ["uuid", "base32", "step", "digits", "label", "created", "updated",
                           "visitor", "name", "proxy", "server_host", "server_port"]
    finally:
        conn.close()


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite3"
    db.write_bytes(b"this is not an SQLite database, just some text that is long enough" * 20)

    async def main() -> None:
        registry = SQLiteRegistry(url_for(db))
        try:
            with pytest.raises(RegistryError, match=str(db)):
                await registry.get("hub")
            with pytest.raises(RegistryError, match=str(db)):
                await registry.list()
        finally:
            await registry.close()

    asyncio.run(main())


def test_a_path_that_cannot_be_created(tmp_path: Path) -> None:
    # A regular file where a folder should be: fails even for root, unlike a chmod.
    (tmp_path / "file").write_text("")
    db = tmp_path / "file" / "registry.sqlite3"

    async def main() -> None:
        registry = SQLiteRegistry(url_for(db))
        try:
            with pytest.raises(RegistryError, match=str(db)):
                await registry.ping()
            with pytest.raises(RegistryError, match=str(db)):
                await registry.add(Entry(uuid="hub", base32="AAAA"))
        finally:
            await registry.close()

    asyncio.run(main())


def test_a_folder_where_the_file_should_be(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite3"
    db.mkdir()

    async def main() -> None:
        registry = SQLiteRegistry(url_for(db))
        try:
            with pytest.raises(RegistryError, match=str(db)):
                await registry.get("hub")
        finally:
            await registry.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/rendezvous/registry.sqlite3", "/var/lib/rendezvous/registry.sqlite3"),
        # What config.default_registry_url() builds from an absolute path.
        ("sqlite:////var/lib/rendezvous/registry.sqlite3", "/var/lib/rendezvous/registry.sqlite3"),
        ("sqlite://data/registry.sqlite3", "data/registry.sqlite3"),
        ("sqlite:data/registry.sqlite3", "data/registry.sqlite3"),
        ("sqlite:registry.sqlite3", "registry.sqlite3"),
    ],
)
def test_path_from_url(url: str, path: str) -> None:
    assert path_from_url(url) == Path(path)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:", "sqlite:///x.db?mode=ro"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        SQLiteRegistry(url)


def test_relative_path_is_relative_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    async def main() -> None:
        registry = SQLiteRegistry("sqlite://data/registry.sqlite3")
        try:
            await registry.add(Entry(uuid="hub", base32="AAAA"))
        finally:
            await registry.close()

    asyncio.run(main())
    assert (tmp_path / "data" / "registry.sqlite3").is_file()


def test_a_file_from_before_the_visitor_column_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE entries (uuid TEXT PRIMARY KEY, base32 TEXT NOT NULL, step "
                     "INTEGER NOT NULL, digits INTEGER NOT NULL, label TEXT NOT NULL DEFAULT '', "
                     "created REAL NOT NULL, updated REAL NOT NULL)")
        conn.execute("INSERT INTO entries VALUES ('old', 'JBSWY3DPEHPK3PXP', 30, 6, '', 1, 1)")
    conn.close()

    async def body() -> None:
        registry = SQLiteRegistry(f"sqlite:///{path}")
        entry = await registry.get("old")
        assert entry is not None and entry.visitor is None
        secret = VisitorSecret.from_password("old", "pw")
        await registry.replace(replace(entry, visitor=secret))
        again = await registry.get("old")
        assert again is not None and again.visitor == secret
        await registry.close()

    asyncio.run(body())


def test_a_file_from_before_names_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE entries (uuid TEXT PRIMARY KEY, base32 TEXT NOT NULL, step "
                     "INTEGER NOT NULL, digits INTEGER NOT NULL, label TEXT NOT NULL DEFAULT '', "
                     "created REAL NOT NULL, updated REAL NOT NULL, "
                     "visitor TEXT NOT NULL DEFAULT '')")
        conn.execute("INSERT INTO entries VALUES ('old', 'JBSWY3DPEHPK3PXP', 30, 6, '', 1, 1, '')")
        conn.execute("INSERT INTO entries VALUES ('old2', 'JBSWY3DPEHPK3PXP', 30, 6, '', 2, 2, '')")
    conn.close()

    async def body() -> None:
        registry = SQLiteRegistry(f"sqlite:///{path}")
        entry = await registry.get("old")
        assert entry is not None and entry.name == ""
        await registry.replace(replace(entry, name="hub"))
        assert await registry.by_name("hub") == replace(entry, name="hub")
        other = await registry.get("old2")
        assert other is not None
        with pytest.raises(DuplicateName):
            await registry.replace(replace(other, name="hub"))
        await registry.close()

    asyncio.run(body())


def test_a_file_from_before_the_proxy_column_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old_schema = ("CREATE TABLE entries (uuid TEXT PRIMARY KEY, base32 TEXT NOT NULL, step "
                  "INTEGER NOT NULL, digits INTEGER NOT NULL, label TEXT NOT NULL DEFAULT '', "
                  "created REAL NOT NULL, updated REAL NOT NULL, "
                  "visitor TEXT NOT NULL DEFAULT '', name TEXT NOT NULL DEFAULT '')")
    old_insert = ("INSERT INTO entries (uuid, base32, step, digits, label, created, updated, "
                  "visitor, name) VALUES (?, 'JBSWY3DPEHPK3PXP', 30, 6, '', 1, 1, '', '')")
    with sqlite3.connect(path) as conn:
        conn.execute(old_schema)
        conn.execute(old_insert, ("old",))
    conn.close()

    async def body() -> None:
        registry = SQLiteRegistry(f"sqlite:///{path}")
        entry = await registry.get("old")
        assert entry is not None and entry.proxy_protocol == 0
        await registry.replace(replace(entry, proxy_protocol=2))
        # A program of the version before, writing its own columns, still can; its rows
        # have no PROXY option, and a rotation it makes keeps ours.
        with sqlite3.connect(path) as older:
            older.execute(old_insert, ("older",))
            older.execute("UPDATE entries SET base32 = 'AAAA', updated = 2 WHERE uuid = 'old'")
        older.close()
        again = await registry.get("old")
        assert again is not None and (again.proxy_protocol, again.base32) == (2, "AAAA")
        newer = await registry.get("older")
        assert newer is not None and newer.proxy_protocol == 0
        await registry.close()

    asyncio.run(body())


def test_a_proxy_value_that_is_no_version_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"

    async def body() -> None:
        registry = SQLiteRegistry(f"sqlite:///{path}")
        await registry.add(Entry(uuid="hub", base32="JBSWY3DPEHPK3PXP", proxy_protocol=1))
        with sqlite3.connect(path) as conn:  # a hand edit with the sqlite3 shell
            conn.execute("UPDATE entries SET proxy = 7 WHERE uuid = 'hub'")
        conn.close()
        entry = await registry.get("hub")
        assert entry is not None and entry.proxy_protocol == 0
        await registry.close()

    asyncio.run(body())


def test_a_file_from_before_entries_had_their_own_relay_address_is_upgraded(
        tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE entries (uuid TEXT PRIMARY KEY, base32 TEXT NOT NULL, step "
                     "INTEGER NOT NULL, digits INTEGER NOT NULL, label TEXT NOT NULL DEFAULT '', "
                     "created REAL NOT NULL, updated REAL NOT NULL, "
                     "visitor TEXT NOT NULL DEFAULT '', name TEXT NOT NULL DEFAULT '', "
                     "proxy INTEGER NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO entries VALUES ('old', 'JBSWY3DPEHPK3PXP', 30, 6, '', 1, 1, "
                     "'', '', 1)")
    conn.close()

    async def body() -> None:
        registry = SQLiteRegistry(f"sqlite:///{path}")
        entry = await registry.get("old")
        assert entry is not None and (entry.server_host, entry.server_port) == ("", 0)
        assert entry.proxy_protocol == 1
        await registry.replace(replace(entry, server_host="relay.example.com", server_port=443))
        again = await registry.get("old")
        assert again is not None
        assert (again.server_host, again.server_port, again.proxy_protocol) == (
            "relay.example.com", 443, 1)
        with sqlite3.connect(path) as conn:  # hand edits that are no address
            conn.execute("UPDATE entries SET server_host = 'two words', server_port = 70000")
        conn.close()
        edited = await registry.get("old")
        assert edited is not None and (edited.server_host, edited.server_port) == ("", 0)
        await registry.close()

    asyncio.run(body())
