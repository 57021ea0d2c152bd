"""The registry interface: what every backend (sqlite, redis, memory) provides."""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from rendezvous.errors import ConfigError
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.protocol.ids import valid_name

DEFAULT_STEP = 30
DEFAULT_DIGITS = 6
# What an entry's ``proxy_protocol`` may be: none, or the PROXY protocol version its hidden
# server's local service wants in front of each pairing (the agent asks with ``&proxy=N``).
PROXY_VERSIONS = (0, 1, 2)
# 160 bits, the size RFC 4226 recommends for an HMAC-SHA1 secret.
SECRET_BYTES = 20


def normal_name(name: str) -> str:
    """``name`` in the form the registry keeps (lower case, no surrounding space); ConfigError
    when it is not one DNS label. The empty string (no name) passes."""
    name = name.strip().lower()
    if name and not valid_name(name):
        raise ConfigError(
            f"invalid name {name!r}: use 1 to 63 letters, digits and hyphens, not starting or "
            "ending with a hyphen (one DNS label)"
        )
    return name


def valid_server_host(host: str) -> bool:
    """Whether ``host`` can be an entry's own relay host: a name or address of at most 253
    characters, no white space or control characters (it goes into files and log lines)."""
    return 0 < len(host) <= 253 and host.isprintable() and not any(c.isspace() for c in host)


def new_secret() -> str:
    """A fresh random base32 TOTP secret (no padding)."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").rstrip("=")


@dataclass(frozen=True, slots=True)
class Entry:
    """One hidden server the relay knows: its ID and the TOTP parameters it parks with."""

    uuid: str
    base32: str
    step: int = DEFAULT_STEP
    digits: int = DEFAULT_DIGITS
    label: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    # With a visitor password, mobile clients must log in for real (protocol/digest.py).
    visitor: VisitorSecret | None = None
    # One DNS label, unique in the registry ("" for none): visitors reach the hidden server at
    # https://NAME.DOMAIN/ with no credentials (see docs/protocol.md, named hidden servers).
    name: str = ""
    # 1 or 2: its provisioning file tells the agent to have each pairing start with a PROXY
    # header of that version (for a local service that speaks it); 0 for none. The relay itself
    # never reads it: the agent asks per connection.
    proxy_protocol: int = 0
    # Where its provisioning files send the hidden server, when the operator said so for this
    # entry (users add/rotate --server-host, --server-port): "" and 0 follow the relay's own
    # recorded address. Kept so that a rotation writes the same relay into the new file.
    server_host: str = ""
    server_port: int = 0

    def same_secret(self, other: Entry) -> bool:
        """Whether a token made for ``other`` is checked the same way against this entry: a
        connection parked with one still holds for the other (a new label or visitor password
        does not unpark anybody; a rotation does)."""
        return (self.base32, self.step, self.digits) == (other.base32, other.step, other.digits)

    def rotated(self) -> Entry:
        """The same entry with a new secret."""
        return replace(self, base32=new_secret(), updated=time.time())

    def to_record(self) -> dict[str, Any]:
        """The JSON record, in node-rendezvous's layout plus our own fields."""
        return {
            "uuid": self.uuid,
            "label": self.label,
            **({"name": self.name} if self.name else {}),
            "created": self.created,
            "updated": self.updated,
            "authParams": {"base32": self.base32, "step": self.step, "digits": self.digits},
            **({"visitor": {"md5": self.visitor.md5, "sha256": self.visitor.sha256}}
               if self.visitor else {}),
            **({"proxyProtocol": self.proxy_protocol} if self.proxy_protocol else {}),
            **({"server": {**({"host": self.server_host} if self.server_host else {}),
                           **({"port": self.server_port} if self.server_port else {})}}
               if self.server_host or self.server_port else {}),
        }

    @classmethod
    def from_record(cls, uuid: str, record: dict[str, Any]) -> Entry:
        """Read a record written by us or by node-rendezvous (which has only ``authParams``)."""
        auth = record["authParams"]
        created = float(record.get("created") or 0.0)
        visitor = record.get("visitor")
        name = record.get("name")
        proxy = record.get("proxyProtocol")
        server = record.get("server")
        if not isinstance(server, dict):
            server = {}
        host, port = server.get("host"), server.get("port")
        return cls(
            uuid=uuid,
            base32=str(auth["base32"]),
            step=int(auth.get("step") or DEFAULT_STEP),
            digits=int(auth.get("digits") or DEFAULT_DIGITS),
            label=str(record.get("label") or ""),
            created=created,
            updated=float(record.get("updated") or created),
            visitor=(VisitorSecret(md5=str(visitor["md5"]), sha256=str(visitor["sha256"]))
                     if isinstance(visitor, dict) else None),
            # A name that is not one label was not written by us: the entry goes on unnamed.
            name=name if isinstance(name, str) and valid_name(name) else "",
            # Likewise a version we do not know: its files ask for no PROXY header.
            proxy_protocol=(proxy if type(proxy) is int and proxy in PROXY_VERSIONS else 0),
            # And an address that is none: its files go to the relay's own.
            server_host=host if isinstance(host, str) and valid_server_host(host) else "",
            server_port=port if type(port) is int and 1 <= port <= 65535 else 0,
        )


@dataclass(frozen=True, slots=True)
class Changes:
    """What a registry watch learned: these IDs were added, changed or removed, or (with
    ``everything``) any entry may have changed, because some changes could not be followed."""

    ids: frozenset[str] = frozenset()
    everything: bool = False


class Registry(abc.ABC):
    """Where hidden servers' IDs and secrets live. Changes take effect at once for every reader.

    Every method may raise :class:`~rendezvous.errors.RegistryError` when the backend fails.
    """

    url: str

    def __init__(self) -> None:
        # One queue per running watch() of this object: writes made through it, at once.
        self._listeners: set[asyncio.Queue[str]] = set()
        self._write_hooks: list[Callable[[str], None]] = []

    def _changed(self, uuid: str) -> None:
        """Tell this object's watchers and write hooks that ``uuid`` changed (backends call it
        after a write)."""
        for hook in self._write_hooks:
            hook(uuid)
        for queue in self._listeners:
            queue.put_nowait(uuid)

    def on_write(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(uuid)`` as soon as a write through this object has changed ``uuid``,
        before the call that wrote returns (a cache of entries forgets it there and then)."""
        self._write_hooks.append(hook)

    def fresh(self) -> bool:
        """Whether :meth:`watch` has reported every change other processes committed so far,
        as far as a cheap check on the caller's thread can tell (SQLite: a few microseconds);
        False sends a cache of entries back to :meth:`get`. Backends that are told of changes
        (Redis, memory) say True: what they have not been told yet, nobody here has seen."""
        return True

    @contextlib.contextmanager
    def _listening(self) -> Iterator[asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            yield queue
        finally:
            self._listeners.discard(queue)

    async def watch(self, interval: float) -> AsyncIterator[Changes]:
        """Changes to the entries, as this process learns of them, for as long as it iterates.

        The first report, as soon as the watch follows changes, is ``everything``: what
        happened before is unknown to it. Then writes through this object are reported at
        once, and writes by other processes (the CLI, other relay nodes) by backends that can
        see them, within about ``interval`` seconds (SQLite polls that often; Redis is told at
        once). A report may name IDs that did not really change; read the entries again to
        know. Raises RegistryError when the backend fails (iterate a new watch to resume).
        This base form sees this object's own writes only, which is all there is for a
        registry held in one process.
        """
        with self._listening() as queue:
            yield Changes(everything=True)
            while True:
                yield Changes(frozenset(await _drain(queue, None)))

    @abc.abstractmethod
    async def get(self, uuid: str) -> Entry | None:
        """The entry with this ID, or None."""

    @abc.abstractmethod
    async def by_name(self, name: str) -> Entry | None:
        """The entry named ``name`` (lower case), or None."""

    @abc.abstractmethod
    async def add(self, entry: Entry) -> None:
        """Store a new entry; raise DuplicateEntry if the ID exists, DuplicateName if another
        entry has its name."""

    @abc.abstractmethod
    async def replace(self, entry: Entry) -> None:
        """Overwrite an existing entry (a rotation, a rename); raise UnknownEntry if it does not
        exist, DuplicateName if another entry has its name."""

    @abc.abstractmethod
    async def remove(self, uuid: str) -> None:
        """Delete an entry (and free its name); raise UnknownEntry if it does not exist."""

    @abc.abstractmethod
    async def list(self) -> list[Entry]:
        """Every entry, oldest first."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise RegistryError if the backend is unreachable."""

    async def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release connections and files."""


async def _drain(queue: asyncio.Queue[str], timeout: float | None) -> set[str]:
    """Everything in ``queue`` once something is there (waiting at most ``timeout`` seconds;
    then possibly nothing)."""
    found: set[str] = set()
    try:
        found.add(await asyncio.wait_for(queue.get(), timeout))
    except TimeoutError:
        return found
    while not queue.empty():
        found.add(queue.get_nowait())
    return found
