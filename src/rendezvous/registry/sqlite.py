"""The embedded default registry: one SQLite file, shared with the ``rendezvous users`` CLI.

The server and the CLI may have the same file open at once, in different processes. WAL journal
mode lets the server's readers go on while the CLI writes, and nothing is cached here, so a change
the CLI commits is seen by the very next ``get()``.

Triggers on the table append the ID of every inserted, updated or deleted row to a ``changes``
log, whichever program writes (ours of any version, or the ``sqlite3`` shell). ``watch()`` polls
``PRAGMA data_version``, which moves only when another connection has committed, and reads the
log past the last change it saw: a few microseconds per poll when nothing happened.

Every call runs synchronously on the caller's thread (the event loop, in the server):

- ``get()`` is a single-row primary-key SELECT, a few microseconds. In WAL mode a reader never
  waits for a writer, so it cannot stall the loop behind the CLI. Handing it to a thread pool would
  cost more than the query.
- Writes are rare operator actions; the busy timeout bounds how long one may wait for another
  process's write lock.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rendezvous.errors import (
    ConfigError,
    DuplicateEntry,
    DuplicateName,
    RegistryError,
    UnknownEntry,
)
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.registry.base import (
    PROXY_VERSIONS,
    Changes,
    Entry,
    Registry,
    _drain,
    valid_server_host,
)

# How long a statement waits for another connection's lock before failing. Only writers contend
# (the CLI against a rotation from the admin page), and each holds the lock for milliseconds.
BUSY_TIMEOUT_MS = 5000

_SCHEME = "sqlite:"

# The first copy of the WAL index header (https://www.sqlite.org/walformat.html): each commit
# writes a new one (its change counter, frame count and checksums move).
WAL_INDEX_HEADER = 48

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    uuid    TEXT PRIMARY KEY,
    base32  TEXT NOT NULL,
    step    INTEGER NOT NULL,
    digits  INTEGER NOT NULL,
    label   TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    visitor TEXT NOT NULL DEFAULT '',
    name    TEXT NOT NULL DEFAULT '',
    proxy   INTEGER NOT NULL DEFAULT 0,
    server_host TEXT NOT NULL DEFAULT '',
    server_port INTEGER NOT NULL DEFAULT 0
)
"""
# Files made before the visitor check, names, the PROXY option or entries' own relay address
# lack their columns: added on open (older programs ignore columns they do not select).
_MIGRATIONS = {
    "visitor": "ALTER TABLE entries ADD COLUMN visitor TEXT NOT NULL DEFAULT ''",
    "name": "ALTER TABLE entries ADD COLUMN name TEXT NOT NULL DEFAULT ''",
    "proxy": "ALTER TABLE entries ADD COLUMN proxy INTEGER NOT NULL DEFAULT 0",
    "server_host": "ALTER TABLE entries ADD COLUMN server_host TEXT NOT NULL DEFAULT ''",
    "server_port": "ALTER TABLE entries ADD COLUMN server_port INTEGER NOT NULL DEFAULT 0",
}
# Names are unique among the entries that have one; the index also serves by_name().
_NAME_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS entries_name ON entries (name) WHERE name <> ''"
# Changes the log keeps (each write prunes older ones). A watcher that falls further behind
# than this, which takes that many writes between two polls, re-checks everything.
CHANGES_KEPT = 1000

_CHANGES = f"""
CREATE TABLE IF NOT EXISTS changes (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_inserted AFTER INSERT ON entries BEGIN
    INSERT INTO changes (uuid) VALUES (new.uuid);
    DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - {CHANGES_KEPT};
END;
CREATE TRIGGER IF NOT EXISTS entries_updated AFTER UPDATE ON entries BEGIN
    INSERT INTO changes (uuid) VALUES (old.uuid);
    INSERT INTO changes (uuid) SELECT new.uuid WHERE new.uuid IS NOT old.uuid;
    DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - {CHANGES_KEPT};
END;
CREATE TRIGGER IF NOT EXISTS entries_deleted AFTER DELETE ON entries BEGIN
    INSERT INTO changes (uuid) VALUES (old.uuid);
    DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - {CHANGES_KEPT};
END;
"""

_COLUMNS = ("uuid, base32, step, digits, label, created, updated, visitor, name, proxy,"
            " server_host, server_port")
_PLACEHOLDERS = ", ".join("?" * len(_COLUMNS.split(",")))


def _open_wal_index(database: Path) -> int | None:
    """A read-only descriptor of ``database``'s WAL index (its -shm file, shared by every
    connection), or None where there is none (then fresh() asks SQLite every time). Read with
    pread, never mapped: another connection may truncate the file while it rebuilds the
    index, and a mapped read past the end would kill the process (SIGBUS)."""
    try:
        return os.open(f"{database}-shm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _read_header(index: int) -> bytes | None:
    """The WAL index's header, or None while it is not whole (being rebuilt, say)."""
    try:
        header = os.pread(index, WAL_INDEX_HEADER, 0)
    except OSError:
        return None
    return header if len(header) == WAL_INDEX_HEADER else None


def path_from_url(url: str) -> Path:
    """The database file named by a ``sqlite:`` URL.

    ``sqlite:///abs/file`` and ``sqlite:////abs/file`` name an absolute path; ``sqlite://rel/file``
    and ``sqlite:rel/file`` name a path relative to the current directory.
    """
    if not url.startswith(_SCHEME):
        raise ConfigError(f"not a sqlite registry URL: {url!r}")
    rest = url[len(_SCHEME) :]
    if rest.startswith("//"):
        # The authority part is always empty for a local file; drop the "//" that introduces it.
        rest = rest[2:]
    if rest.startswith("/"):
        # Collapse "////abs" (SQLAlchemy's absolute form, which config.py emits) to "/abs".
        rest = "/" + rest.lstrip("/")
    if "?" in rest or "#" in rest:
        raise ConfigError(f"sqlite registry URL {url!r}: query strings are not supported")
    if rest in ("", "/"):
        raise ConfigError(f"sqlite registry URL {url!r} names no file")
    return Path(rest)


def _visitor_text(entry: Entry) -> str:
    if entry.visitor is None:
        return ""
    return json.dumps({"md5": entry.visitor.md5, "sha256": entry.visitor.sha256})


def _row(entry: Entry) -> tuple[Any, ...]:
    """``entry``'s values in the order of ``_COLUMNS``."""
    return (entry.uuid, entry.base32, entry.step, entry.digits, entry.label, entry.created,
            entry.updated, _visitor_text(entry), entry.name, entry.proxy_protocol,
            entry.server_host, entry.server_port)


def _entry(row: tuple[Any, ...]) -> Entry:
    (uuid, base32, step, digits, label, created, updated, visitor, name, proxy, server_host,
     server_port) = row
    secret = json.loads(visitor) if visitor else None
    return Entry(
        uuid=uuid,
        base32=base32,
        step=int(step),
        digits=int(digits),
        label=label or "",
        created=float(created),
        updated=float(updated),
        visitor=VisitorSecret(secret["md5"], secret["sha256"]) if secret else None,
        name=name or "",
        # (Values no program of ours writes: a hand-edited row.)
        proxy_protocol=proxy if proxy in PROXY_VERSIONS else 0,
        server_host=(server_host if isinstance(server_host, str)
                     and valid_server_host(server_host) else ""),
        server_port=server_port if type(server_port) is int and 1 <= server_port <= 65535 else 0,
    )


def _integrity(entry: Entry, exc: sqlite3.IntegrityError) -> DuplicateEntry | DuplicateName:
    """Which unique constraint a write broke: the ID's or the name's."""
    if "entries.name" in str(exc):
        return DuplicateName(entry.name)
    return DuplicateEntry(entry.uuid)


class SQLiteRegistry(Registry):
    """Entries in a table of a SQLite file; the file and its folder are created on first use."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.path = path_from_url(url)
        self._conn: sqlite3.Connection | None = None
        # PRAGMA data_version as of the last poll of a watch: commits by others move it.
        self._watched_version: int | None = None
        # The WAL index (the -shm file, read-only) whose header every commit rewrites, and the
        # watched version with the header as fresh() last found them current: see fresh().
        self._wal_index: int | None = None
        self._vouched: tuple[int, bytes] | None = None

    def _error(self, action: str, exc: BaseException) -> RegistryError:
        return RegistryError(f"registry {self.path}: cannot {action}: {exc}")

    def _connect(self) -> sqlite3.Connection:
        """The open connection, opening the file and creating the table the first time."""
        if self._conn is not None:
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error("create its folder", exc) from exc
        try:
            # timeout= is SQLite's busy_timeout. isolation_level=None: autocommit, so no read
            # transaction is ever left open and each SELECT sees what other processes committed.
            # check_same_thread=False: SQLite serialises access itself, and callers may hop threads.
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        try:
            wal = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0] == "wal"
            conn.execute(_SCHEMA)
            present = {row[1] for row in conn.execute("PRAGMA table_info(entries)").fetchall()}
            for column, statement in _MIGRATIONS.items():
                if column not in present:
                    conn.execute(statement)
            conn.execute(_NAME_INDEX)
            conn.executescript(_CHANGES)
        except sqlite3.Error as exc:
            conn.close()
            raise self._error("open", exc) from exc
        self._conn = conn
        self._close_wal_index()
        self._wal_index = _open_wal_index(self.path) if wal else None
        return conn

    def _query(self, action: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            # fetchall() steps the statement to its end, which resets it and ends the implicit
            # read transaction: a half-read cursor would pin an old snapshot of the WAL.
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._error(action, exc) from exc

    def _change(self, action: str, sql: str, params: tuple[Any, ...]) -> int:
        """Run one write statement; the number of rows it changed."""
        conn = self._connect()
        try:
            return conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise self._error(action, exc) from exc

    async def get(self, uuid: str) -> Entry | None:
        rows = self._query("read", f"SELECT {_COLUMNS} FROM entries WHERE uuid = ?", (uuid,))
        return _entry(rows[0]) if rows else None

    async def by_name(self, name: str) -> Entry | None:
        if not name:
            return None
        rows = self._query("read", f"SELECT {_COLUMNS} FROM entries WHERE name = ?", (name,))
        return _entry(rows[0]) if rows else None

    async def add(self, entry: Entry) -> None:
        conn = self._connect()
        try:
            conn.execute(
                f"INSERT INTO entries ({_COLUMNS}) VALUES ({_PLACEHOLDERS})",
                _row(entry),
            )
        except sqlite3.IntegrityError as exc:
            # The primary key and the name index are the only constraints an Entry can violate.
            raise _integrity(entry, exc) from exc
        except sqlite3.Error as exc:
            raise self._error("write", exc) from exc
        self._changed(entry.uuid)

    async def replace(self, entry: Entry) -> None:
        try:
            changed = self._change(
                "write",
                "UPDATE entries SET base32 = ?, step = ?, digits = ?, label = ?, created = ?,"
                " updated = ?, visitor = ?, name = ?, proxy = ?, server_host = ?,"
                " server_port = ? WHERE uuid = ?",
                (*_row(entry)[1:], entry.uuid),
            )
        except RegistryError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise _integrity(entry, exc.__cause__) from exc.__cause__
            raise
        if changed == 0:
            raise UnknownEntry(entry.uuid)
        self._changed(entry.uuid)

    async def remove(self, uuid: str) -> None:
        if self._change("write", "DELETE FROM entries WHERE uuid = ?", (uuid,)) == 0:
            raise UnknownEntry(uuid)
        self._changed(uuid)

    async def list(self) -> list[Entry]:
        # rowid breaks ties between equal timestamps in insertion order, as the memory backend does.
        rows = self._query("read", f"SELECT {_COLUMNS} FROM entries ORDER BY created, rowid")
        return [_entry(row) for row in rows]

    async def ping(self) -> None:
        self._query("read", "SELECT 1 FROM entries LIMIT 1")

    async def watch(self, interval: float) -> AsyncIterator[Changes]:
        with self._listening() as queue:
            try:
                async for changes in self._poll(queue, interval):
                    yield changes
            finally:
                self._watched_version = None  # followed no more: fresh() says False

    async def _poll(self, queue: asyncio.Queue[str], interval: float
                    ) -> AsyncIterator[Changes]:
        version = self._query("poll", "PRAGMA data_version")[0][0]
        last = self._query("poll", "SELECT coalesce(max(seq), 0) FROM changes")[0][0]
        self._watched_version = version
        yield Changes(everything=True)
        while True:
            ids = await _drain(queue, interval)
            everything = False
            now = self._query("poll", "PRAGMA data_version")[0][0]
            if now != version:  # another connection committed: read the log past ``last``
                version = now
                rows = self._query("poll", "SELECT seq, uuid FROM changes WHERE seq > ?"
                                   " ORDER BY seq", (last,))
                if rows:
                    # The log starts after ``last + 1``: changes in between were pruned.
                    everything = rows[0][0] > last + 1
                    last = rows[-1][0]
                    ids.update(str(row[1]) for row in rows)
            if ids or everything:
                yield Changes(frozenset(ids), everything)
            self._watched_version = version  # (once the report is taken in)

    def fresh(self) -> bool:
        """The watch is current if ``PRAGMA data_version`` is where it last polled. A known
        hidden server's CONNECT asks this each time, and the PRAGMA costs three system calls
        (a lock, an unlock, an fstat) and 13k instructions: while the WAL index's header is the
        one read when this last said True, no connection has committed since (every commit
        rewrites it: SQLite's WAL format, "iChange"), so the answer is True again after one
        pread."""
        watched = self._watched_version
        if watched is None:
            return False
        index, conn = self._wal_index, self._conn
        # Read before the PRAGMA: a commit after this read changes what the next call sees.
        header = _read_header(index) if index is not None else None
        if header is not None and self._vouched == (watched, header):
            return True
        try:
            version = self._query("poll", "PRAGMA data_version")[0][0]
        except RegistryError:
            return False  # get() will say what is wrong
        if version != watched:
            return False
        if header is not None and conn is not None and self._conn is conn:  # (not reopened)
            self._vouched = (watched, header)
        return True

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
        self._close_wal_index()

    def _close_wal_index(self) -> None:
        if self._wal_index is not None:
            index, self._wal_index = self._wal_index, None
            os.close(index)
        self._vouched = None
