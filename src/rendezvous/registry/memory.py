"""A registry held in this process only: for tests and throwaway runs."""

from __future__ import annotations

from rendezvous.errors import DuplicateEntry, UnknownEntry
from rendezvous.registry.base import Entry, Registry


class MemoryRegistry(Registry):
    """Entries in a dict; gone when the process ends."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._entries: dict[str, Entry] = {}

    async def get(self, uuid: str) -> Entry | None:
        return self._entries.get(uuid)

    async def add(self, entry: Entry) -> None:
        if entry.uuid in self._entries:
            raise DuplicateEntry(entry.uuid)
        self._entries[entry.uuid] = entry

    async def replace(self, entry: Entry) -> None:
        if entry.uuid not in self._entries:
            raise UnknownEntry(entry.uuid)
        self._entries[entry.uuid] = entry

    async def remove(self, uuid: str) -> None:
        if self._entries.pop(uuid, None) is None:
            raise UnknownEntry(uuid)

    async def list(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.created)

    async def ping(self) -> None:
        return None
