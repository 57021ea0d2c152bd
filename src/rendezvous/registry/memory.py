"""A registry held in this process only: for tests and throwaway runs."""

from __future__ import annotations

from rendezvous.errors import DuplicateEntry, DuplicateName, UnknownEntry
from rendezvous.registry.base import Entry, Registry


class MemoryRegistry(Registry):
    """Entries in a dict; gone when the process ends."""

    def __init__(self, url: str = "memory://") -> None:
        super().__init__()
        self.url = url
        self._entries: dict[str, Entry] = {}
        self._names: dict[str, str] = {}  # name -> ID

    async def get(self, uuid: str) -> Entry | None:
        return self._entries.get(uuid)

    async def by_name(self, name: str) -> Entry | None:
        uuid = self._names.get(name) if name else None
        return self._entries.get(uuid) if uuid is not None else None

    def _check_name(self, entry: Entry) -> None:
        owner = self._entries.get(self._names.get(entry.name, "")) if entry.name else None
        if owner is not None and owner.uuid != entry.uuid:
            raise DuplicateName(entry.name)

    def _store(self, entry: Entry) -> None:
        old = self._entries.get(entry.uuid)
        if old is not None and old.name:
            self._names.pop(old.name, None)
        if entry.name:
            self._names[entry.name] = entry.uuid
        self._entries[entry.uuid] = entry

    async def add(self, entry: Entry) -> None:
        if entry.uuid in self._entries:
            raise DuplicateEntry(entry.uuid)
        self._check_name(entry)
        self._store(entry)
        self._changed(entry.uuid)

    async def replace(self, entry: Entry) -> None:
        if entry.uuid not in self._entries:
            raise UnknownEntry(entry.uuid)
        self._check_name(entry)
        self._store(entry)
        self._changed(entry.uuid)

    async def remove(self, uuid: str) -> None:
        old = self._entries.pop(uuid, None)
        if old is None:
            raise UnknownEntry(uuid)
        if old.name:
            self._names.pop(old.name, None)
        self._changed(uuid)

    async def list(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.created)

    async def ping(self) -> None:
        return None
