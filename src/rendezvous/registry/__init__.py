"""The registry of hidden servers: one interface, backends picked by URL scheme.

``sqlite:///path`` (the embedded default), ``redis://host:port/db`` (several relay nodes, and
node-rendezvous's own data), ``memory://`` (tests, throwaway runs).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from rendezvous.errors import ConfigError
from rendezvous.registry.base import Entry, Registry, new_secret


def _open_memory(url: str) -> Registry:
    from rendezvous.registry.memory import MemoryRegistry

    return MemoryRegistry(url)


def _open_sqlite(url: str) -> Registry:
    from rendezvous.registry.sqlite import SQLiteRegistry

    return SQLiteRegistry(url)


def _open_redis(url: str) -> Registry:
    from rendezvous.registry.redis import RedisRegistry

    return RedisRegistry(url)


_BACKENDS: dict[str, Callable[[str], Registry]] = {
    "memory": _open_memory,
    "sqlite": _open_sqlite,
    "redis": _open_redis,
    "rediss": _open_redis,
}


def open_registry(url: str) -> Registry:
    """The registry backend for ``url``; raise ConfigError for an unknown scheme."""
    scheme = urlsplit(url).scheme
    try:
        opener = _BACKENDS[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in _BACKENDS)
        raise ConfigError(f"unknown registry URL {url!r}: expected one of {known}") from None
    return opener(url)


__all__ = ["Entry", "Registry", "new_secret", "open_registry"]
