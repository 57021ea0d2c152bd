"""server/memory.py: free heap memory goes back to the system, under glibc and under jemalloc.

Each heap test runs in a fresh interpreter (a clean heap, and jemalloc needs LD_PRELOAD at
start): it mallocs 64 MiB in 64 KiB blocks through ctypes (below glibc's mmap threshold, so in
the heap; a "large" size in jemalloc), touches every page, frees seven blocks in eight (holes
amid the heap that neither allocator returns by itself), and then asks MemoryTrimmer.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rendezvous.server.memory import BURST_GROWTH, MemoryTrimmer, resident_bytes

JEMALLOC = next((p for p in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                             "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2") if Path(p).exists()),
                None)
MiB = 1 << 20

FRAGMENT = """
import asyncio, ctypes, json
from rendezvous.server.memory import MemoryTrimmer, resident_bytes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = 64 * 1024
blocks = [libc.malloc(block) for _ in range(1024)]
for pointer in blocks:
    ctypes.memset(pointer, 1, block)
full = resident_bytes()
for index, pointer in enumerate(blocks):
    if index % 8:
        libc.free(pointer)
freed = resident_bytes()
trimmer = MemoryTrimmer(asyncio.new_event_loop(), interval=10.0)
released = trimmer.trim()
print(json.dumps({"allocator": trimmer.allocator, "full": full, "freed": freed,
                  "released": released, "after": resident_bytes()}))
"""


def fragment(env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("allocator", ["glibc", "jemalloc"])
def test_trim_gives_freed_heap_back(allocator: str) -> None:
    env = {}
    if allocator == "jemalloc":
        if JEMALLOC is None:
            pytest.skip("libjemalloc2 is not installed (scripts/test installs it)")
        env["LD_PRELOAD"] = JEMALLOC
    result = fragment(env)
    assert result["allocator"] == allocator
    full, freed, released, after = (int(result[k]) for k in  # type: ignore[call-overload]
                                    ("full", "freed", "released", "after"))
    # Freeing alone gave (almost) nothing back: the holes are amid the heap.
    assert freed > full - 16 * MiB, result
    # The trim gave back most of the 56 MiB freed.
    assert released >= 40 * MiB, result
    assert after <= freed - 40 * MiB, result


class Counter:
    """Stands in for the hub's open-connection count: a number the test sets."""

    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


def test_trims_when_a_burst_ends_and_on_its_interval_while_rss_grows() -> None:
    async def scenario() -> tuple[int, int, int, int, int]:
        loop = asyncio.get_running_loop()
        connections = Counter()
        trimmer = MemoryTrimmer(loop, interval=0.6, connections=connections, check_every=0.02)
        trimmer.start()
        try:
            connections.value = 1000
            await asyncio.sleep(0.1)
            before_burst_end = trimmer.trims
            connections.value = 900  # fewer than BURST_DROP closed: no burst yet
            await asyncio.sleep(0.1)
            small_drop = trimmer.trims
            connections.value = 10  # the burst is over
            await asyncio.sleep(0.1)
            burst = trimmer.trims
            await asyncio.sleep(0.8)  # an interval with RSS as it was: no call
            idle = trimmer.trims
            grown = bytearray(b"x") * (4 * MiB)  # RSS grew a little: the interval calls
            await asyncio.sleep(0.8)
            del grown
            return before_burst_end, small_drop, burst, idle, trimmer.trims
        finally:
            trimmer.stop()

    before, small, burst, idle, later = asyncio.run(scenario())
    assert before == small == 0
    assert burst == idle == 1
    assert later == 2


def test_trims_when_rss_grew_by_a_burst_shorter_than_a_check() -> None:
    """A burst that came and went between two checks leaves no trace in the connection count;
    it leaves RSS grown, which the next check sees."""
    async def scenario() -> tuple[int, int]:
        trimmer = MemoryTrimmer(asyncio.get_running_loop(), interval=30.0,
                                connections=Counter(), check_every=0.02)
        trimmer.start()
        try:
            await asyncio.sleep(0.1)
            quiet = trimmer.trims
            grown = bytearray(b"x") * (BURST_GROWTH + 8 * MiB)  # every page touched
            await asyncio.sleep(0.1)
            del grown
            return quiet, trimmer.trims
        finally:
            trimmer.stop()

    quiet, after = asyncio.run(scenario())
    assert quiet == 0
    assert after >= 1


def test_interval_zero_never_trims() -> None:
    async def scenario() -> int:
        connections = Counter()
        trimmer = MemoryTrimmer(asyncio.get_running_loop(), interval=0, connections=connections,
                                check_every=0.01)
        trimmer.start()
        connections.value = 5000
        await asyncio.sleep(0.05)
        connections.value = 0
        await asyncio.sleep(0.05)
        trimmer.stop()
        return trimmer.trims

    assert asyncio.run(scenario()) == 0


def test_resident_bytes_is_this_process() -> None:
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines()
               if line.startswith("VmRSS:"))
    assert abs(resident_bytes() - rss) < 8 * MiB
