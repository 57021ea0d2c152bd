"""A registry in Redis, in node-rendezvous's own layout: for several relay nodes, or its old data.

Layout [compat]: the key is the ID itself and the value is a JSON record,
``{"authParams": {"base32": ..., "step": ..., "digits": ...}, "label": ..., "created": ...,
"updated": ..., "uuid": ...}``. The original wrote only ``authParams`` (``base32`` and ``step``);
:meth:`Entry.from_record` fills in the rest. The database may hold other data too: any key whose
value is not such a record is not an entry, and is neither listed nor returned by ``get()``.

Names (ours alone): an entry's record carries ``"name"``, and ``rendezvous:name:<name>`` holds its
ID, so every relay node finds an entry by name with one GET. Writes that touch a name run as Lua
scripts, so two nodes can never give one name to two entries. A mapping whose entry is gone or no
longer has that name is stale and counts as free (the original's tools delete keys without it).

Every write also publishes the ID on :func:`channel` (in the same script), so that every relay
node learns of it at once; keyspace notifications are off by default and cannot be relied on.
Writers that do not publish (node-rendezvous, ``redis-cli``) are caught by a periodic re-check.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from rendezvous.errors import (
    ConfigError,
    DuplicateEntry,
    DuplicateName,
    RegistryError,
    UnknownEntry,
)
from rendezvous.registry.base import Changes, Entry, Registry

# An unreachable Redis should fail a CONNECT or a CLI command within seconds, not hang it.
CONNECT_TIMEOUT = 3.0
# Our commands take microseconds; a reply this late means Redis is stuck, and a clear error beats
# holding every CONNECT behind it.
COMMAND_TIMEOUT = 3.0
# One immediate retry on a fresh connection rides over a Redis restart (pooled sockets go stale,
# which shows as a ConnectionError). Timeouts are not retried: that would only double the wait.
RETRIES = 1
# Keys per SCAN step and per MGET: big enough to be few round trips, small enough to keep Redis
# responsive to other clients.
BATCH = 500
# A watch reports "anything may have changed" this often, for writers that do not publish, and
# pings Redis: a subscription that got no answer to the previous ping is dead.
RECHECK_INTERVAL = 30.0
CHANNEL_PREFIX = "rendezvous:registry:"

_T = TypeVar("_T")

# Where the name -> ID mapping lives, beside the cluster's own keys (server/cluster.py).
NAME_PREFIX = "rendezvous:name:"

# The name a record names, or nil (not JSON, not ours, another type: pcall keeps it quiet).
_LUA_NAME_OF = """
local function name_of(key)
  local ok, record = pcall(function() return cjson.decode(redis.call('GET', key)) end)
  if ok and type(record) == 'table' and type(record['name']) == 'string' then
    return record['name']
  end
  return nil
end
"""

# KEYS: the entry's key, the new name's mapping key ('' for no name).
# ARGV: the record, 'add' or 'replace', the new name ('' for none), NAME_PREFIX, the channel.
_LUA_SAVE = _LUA_NAME_OF + """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[2] == 'add' and exists then return 'duplicate' end
if ARGV[2] == 'replace' and not exists then return 'unknown' end
if ARGV[3] ~= '' then
  local owner = redis.call('GET', KEYS[2])
  if owner and owner ~= KEYS[1] and name_of(owner) == ARGV[3] then return 'name' end
end
if exists then
  local old = name_of(KEYS[1])
  if old and old ~= ARGV[3] and redis.call('GET', ARGV[4] .. old) == KEYS[1] then
    redis.call('DEL', ARGV[4] .. old)
  end
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], KEYS[1]) end
redis.call('PUBLISH', ARGV[5], KEYS[1])
return 'ok'
"""

# KEYS: the entry's key. ARGV: NAME_PREFIX, the channel. The number of keys deleted (0: no
# such entry).
_LUA_REMOVE = _LUA_NAME_OF + """
local old = name_of(KEYS[1])
if old and redis.call('GET', ARGV[1] .. old) == KEYS[1] then
  redis.call('DEL', ARGV[1] .. old)
end
local removed = redis.call('DEL', KEYS[1])
if removed > 0 then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return removed
"""


def redacted(url: str) -> str:
    """``url`` without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def decode_entry(key: bytes | str, value: bytes | str | None) -> Entry | None:
    """The entry stored as ``value`` under ``key``, or None if it is not one of ours."""
    try:
        uuid = key.decode("utf-8") if isinstance(key, bytes) else key
        if value is None:
            return None
        record = json.loads(value)
        if not isinstance(record, dict):
            return None
        auth = record.get("authParams")
        if not isinstance(auth, dict) or not isinstance(auth.get("base32"), str):
            return None
        return Entry.from_record(uuid, record)
    except (UnicodeDecodeError, ValueError, TypeError):
        # Not UTF-8, not JSON, or a field of the wrong type: someone else's data.
        return None


def channel(db: int) -> str:
    """The pub/sub channel on which writes to database ``db`` are announced. Pub/sub ignores
    database numbers, so the channel carries it: registries in other databases stay apart."""
    return f"{CHANNEL_PREFIX}{db}"


class _Reconnects:
    """Counts (re)connections of a pub/sub connection: redis-py re-subscribes by itself after a
    drop, and the messages published meanwhile are lost."""

    def __init__(self) -> None:
        self.count = 0

    def seen(self, connection: object) -> None:
        self.count += 1


def _batches(items: Iterable[_T], size: int) -> Iterable[list[_T]]:
    batch: list[_T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class RedisRegistry(Registry):
    """Entries as JSON strings in one Redis database, shared with other relay nodes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._shown = redacted(url)
        try:
            # Bytes in and out: keys written by others need not be UTF-8, and a decode error must
            # skip one key, not fail a whole SCAN.
            self._client: aioredis.Redis = aioredis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=COMMAND_TIMEOUT,
                retry=Retry(NoBackoff(), RETRIES, (redis.exceptions.ConnectionError,)),
                decode_responses=False,
            )
        except ValueError as exc:
            raise ConfigError(f"bad redis registry URL {self._shown}: {exc}") from exc
        self._save = self._client.register_script(_LUA_SAVE)
        self._remove = self._client.register_script(_LUA_REMOVE)
        super().__init__()
        self._channel = channel(int(self._client.connection_pool.connection_kwargs.get("db", 0)))

    async def _call(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run one Redis operation, turning its failures into RegistryError."""
        try:
            return await op()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise RegistryError(f"registry {self._shown} unreachable: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise RegistryError(f"registry {self._shown} failed: {exc}") from exc

    async def _get_raw(self, uuid: str) -> bytes | str | None:
        try:
            value: bytes | str | None = await self._client.get(uuid)
        except redis.exceptions.ResponseError as exc:
            # WRONGTYPE: the key holds a hash, list, ... — someone else's data, not an entry.
            if str(exc).startswith("WRONGTYPE"):
                return None
            raise
        return value

    async def get(self, uuid: str) -> Entry | None:
        value = await self._call(lambda: self._get_raw(uuid))
        return decode_entry(uuid, value)

    async def by_name(self, name: str) -> Entry | None:
        if not name:
            return None
        uuid = await self._call(lambda: self._get_raw(NAME_PREFIX + name))
        if uuid is None:
            return None
        entry = await self.get(uuid.decode("utf-8", "replace") if isinstance(uuid, bytes) else uuid)
        # A stale mapping (its entry gone or renamed by hand) names nothing.
        return entry if entry is not None and entry.name == name else None

    async def _write(self, entry: Entry, mode: str) -> None:
        """Add (``mode`` 'add': the ID must be new) or replace (the ID must exist) ``entry`` and
        move its name mapping, all in one script: never resurrect an entry another node has
        just removed, never let two entries hold one name."""
        data = json.dumps(entry.to_record())
        name_key = NAME_PREFIX + entry.name if entry.name else ""
        outcome: bytes = await self._call(lambda: self._save(
            keys=[entry.uuid, name_key],
            args=[data, mode, entry.name, NAME_PREFIX, self._channel]))
        if outcome == b"duplicate":
            raise DuplicateEntry(entry.uuid)
        if outcome == b"unknown":
            raise UnknownEntry(entry.uuid)
        if outcome == b"name":
            raise DuplicateName(entry.name)
        self._changed(entry.uuid)  # (write hooks, at once; other nodes hear the publish)

    async def add(self, entry: Entry) -> None:
        await self._write(entry, "add")

    async def replace(self, entry: Entry) -> None:
        await self._write(entry, "replace")

    async def remove(self, uuid: str) -> None:
        removed: int = await self._call(
            lambda: self._remove(keys=[uuid], args=[NAME_PREFIX, self._channel]))
        if removed == 0:
            raise UnknownEntry(uuid)
        self._changed(uuid)

    async def _scan(self) -> list[Entry]:
        # SCAN may return a key more than once; a set keeps one of each.
        keys: set[bytes] = set()
        async for key in self._client.scan_iter(count=BATCH):
            keys.add(key)
        entries: list[Entry] = []
        for batch in _batches(sorted(keys), BATCH):
            # MGET gives None for keys that vanished meanwhile or hold a non-string type.
            values: list[Any] = await self._client.mget(batch)
            for key, value in zip(batch, values, strict=True):
                entry = decode_entry(key, value)
                if entry is not None:
                    entries.append(entry)
        return entries

    async def list(self) -> list[Entry]:
        entries = await self._call(self._scan)
        # Redis keeps no insertion order; the ID breaks ties between equal timestamps.
        return sorted(entries, key=lambda e: (e.created, e.uuid))

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def watch(self, interval: float) -> AsyncIterator[Changes]:
        loop = asyncio.get_running_loop()
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        reconnects = _Reconnects()
        try:
            await self._call(lambda: pubsub.subscribe(self._channel))
            assert pubsub.connection is not None
            pubsub.connection.register_connect_callback(reconnects.seen)
            connects = reconnects.count
            recheck = loop.time() + RECHECK_INTERVAL
            unanswered = False  # a ping is out and no pong came back yet
            yield Changes(everything=True)
            while True:
                ids: set[str] = set()
                everything = False
                message = await self._call(lambda: pubsub.get_message(timeout=interval))
                while message is not None:
                    if message.get("type") == "message":
                        data = message.get("data")
                        if isinstance(data, bytes):
                            ids.add(data.decode("utf-8", "replace"))
                    elif message.get("type") == "pong":
                        unanswered = False
                    message = await self._call(lambda: pubsub.get_message(timeout=0))
                if reconnects.count != connects:  # dropped and re-subscribed: we missed some
                    connects = reconnects.count
                    everything = True
                if loop.time() >= recheck:
                    if unanswered:
                        raise RegistryError(f"registry {self._shown}: no answer on the change"
                                            f" channel for {RECHECK_INTERVAL:.0f} s")
                    await self._call(pubsub.ping)
                    unanswered = True
                    recheck = loop.time() + RECHECK_INTERVAL
                    everything = True
                if ids or everything:
                    yield Changes(frozenset(ids), everything)
        finally:
            aclose = getattr(pubsub, "aclose", None)
            await (aclose() if aclose is not None else pubsub.close())

    async def close(self) -> None:
        # aclose() arrived in redis-py 5.0.1; close() is its deprecated older name.
        aclose = getattr(self._client, "aclose", None)
        await (aclose() if aclose is not None else self._client.close())
