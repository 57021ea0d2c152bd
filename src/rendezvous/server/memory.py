"""Giving memory back to the system after a burst of connections.

glibc's malloc keeps the peak heap of every burst: the memory of thousands of short hostile
connections (a scan) is freed when they close, but stays resident, because free chunks amid the
heap are not returned until something asks for it. ``malloc_trim(0)`` does (it releases every
whole free page, not only the top of the heap). jemalloc (preloaded by the unit and the image)
returns free memory by itself only as later allocations let it, so an idle relay keeps it too;
its ``arena.<all>.purge`` does what ``malloc_trim`` does. bench/memory.py measured both (README,
"Memory that comes back"). A call costs a few milliseconds when there is little to give back
(tens when there is a lot), so calling it after each burst, and periodically while the heap
grows, is cheap. Where the
C library has neither (musl), :class:`MemoryTrimmer` does nothing."""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Callable

from rendezvous import logs
from rendezvous.config import DEFAULT_MALLOC_TRIM_INTERVAL

# A trim that gave back less than this (no burst) is not worth a log line.
TRIM_LOG_THRESHOLD = 8 << 20
# A burst has ended when this many fewer connections are open than at its height: ~10 MiB of
# heap at the ~40 KiB a hostile connection costs ...
BURST_DROP = 256
# ... or when RSS has grown this much since the last call (a burst shorter than a check).
BURST_GROWTH = 16 << 20
BURST_CHECK = 1.0  # seconds between two checks (a counter and /proc/self/statm: microseconds)
# The periodic call is skipped while RSS has not grown this much since the last one: memory
# released by a call comes back into RSS when it is used again, so an idle relay's heap has
# nothing new to give back, and a call still walks the free lists (~5 ms on a fragmented heap).
IDLE_SLACK = 1 << 20
MALLCTL_ARENAS_ALL = 4096  # jemalloc's "every arena" index in mallctl names
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _find_release() -> tuple[str, Callable[[], object]] | None:
    """The allocator's call that gives free memory back, and the allocator's name: jemalloc's
    purge of every arena when jemalloc is preloaded (it has ``mallctl``), else glibc's
    ``malloc_trim(0)``; None when the C library has neither (musl)."""
    try:
        # The process's own symbols: a preloaded allocator's come first, then the C library's.
        symbols = ctypes.CDLL(None)
    except OSError:
        return None
    mallctl = getattr(symbols, "mallctl", None)
    if mallctl is not None:
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_size_t]
        mallctl.restype = ctypes.c_int
        command = f"arena.{MALLCTL_ARENAS_ALL}.purge".encode()
        return "jemalloc", lambda: mallctl(command, None, None, None, 0)
    malloc_trim = getattr(symbols, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim.argtypes = [ctypes.c_size_t]
        malloc_trim.restype = ctypes.c_int
        return "glibc", lambda: malloc_trim(0)
    return None


def resident_bytes() -> int:
    """This process's resident memory (RSS), from /proc/self/statm; 0 where there is none."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


class MemoryTrimmer:
    """Give free memory back every ``interval`` seconds on ``loop`` (0: never) unless RSS has
    not grown since the last call, and as soon as a burst ends, checked every ``check_every``
    seconds: when ``connections()`` (the open-connection count) has fallen by ``BURST_DROP`` from
    its highest since the last call, or RSS has grown by ``BURST_GROWTH`` since then.

    ``start()`` and ``stop()``; :meth:`trim` runs one call now and returns the bytes of RSS it
    gave back. A call that gave back at least 8 MiB (a burst ended) is logged: ``memory trimmed``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 interval: float = DEFAULT_MALLOC_TRIM_INTERVAL,
                 connections: Callable[[], int] | None = None,
                 check_every: float = BURST_CHECK) -> None:
        self.loop = loop
        self.interval = interval
        self.connections = connections
        self.check_every = check_every
        self.trims = 0  # calls so far
        found = _find_release()
        self.allocator = found[0] if found else None  # "glibc", "jemalloc" or None
        self._trim = found[1] if found else None
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0  # loop time of the last call
        self._high = 0  # most connections open at once since then
        self._baseline = 0  # RSS right after it

    def start(self) -> None:
        if self.interval > 0 and self._trim is not None and self._timer is None:
            self._last = self.loop.time()
            self._baseline = resident_bytes()
            self._timer = self.loop.call_later(self._period, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def _period(self) -> float:
        return min(self.interval, self.check_every)

    def _tick(self) -> None:
        self._timer = self.loop.call_later(self._period, self._tick)
        now = self.connections() if self.connections is not None else 0
        self._high = max(self._high, now)
        growth = resident_bytes() - self._baseline
        due = self.loop.time() - self._last >= self.interval - 1e-3
        if ((due and growth >= IDLE_SLACK) or self._high - now >= BURST_DROP
                or growth >= BURST_GROWTH):
            self.trim()
            self._high = now

    def trim(self) -> int:
        """Give free heap pages back now; the RSS released, in bytes."""
        if self._trim is None:
            return 0
        self._last = self.loop.time()
        self.trims += 1
        before, started = resident_bytes(), time.perf_counter()
        self._trim()
        self._baseline = resident_bytes()
        released = before - self._baseline
        if released >= TRIM_LOG_THRESHOLD:
            logs.event("memory trimmed", allocator=self.allocator,
                       released_mib=round(released / (1 << 20), 1),
                       rss_mib=round((before - released) / (1 << 20), 1),
                       ms=round((time.perf_counter() - started) * 1000, 1))
        return released
