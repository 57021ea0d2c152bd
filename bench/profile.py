"""Turn py-spy's collapsed stacks (``--format raw --native``) into a short text report.

Three views: where the samples end (self time, the frames that burn the CPU), which functions
are on the stack (inclusive time), and self time grouped by component (OpenSSL, system calls,
the interpreter, uvloop, our relay's Python, ...), which answers "is the time in TLS or outside".
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

# py-spy's own frames and the bench agents' idle helper threads are not the process's work.
_IGNORED_THREADS = ("watch_stdin", "watch_clock")
# Leaf frames where the process waits rather than works (py-spy records some of them as active).
_WAITS = {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6",
          "clock_nanosleep", "nanosleep"}
# Frames under which a thread waits for a lock, a condition or the GIL (the relay's log writer
# thread between batches, say): whatever the leaf below them, not work.
_BLOCKED = ("pthread_cond_timedwait", "pthread_cond_wait", "sem_clockwait", "sem_timedwait",
            "sem_wait", "take_gil", "lock_PyThread_acquire_lock")
_FRAME_INLINE = re.compile(r"^(.*) \((.*)\)$")


def component(frame: str) -> str:
    """The part of the process a leaf frame belongs to."""
    match = _FRAME_INLINE.match(frame)
    where = match.group(2) if match else frame
    name = match.group(1) if match else frame
    if "libssl" in where or "libcrypto" in where:
        return "OpenSSL (libssl/libcrypto)"
    if "libc.so" in where or "libpthread" in where:
        if name in {"malloc", "free", "realloc", "calloc", "memcpy", "memmove", "memset"} or (
            name.startswith(("_int_", "__memcpy", "__memmove", "__memset", "cfree"))
        ):
            return "libc memory (malloc/free/memcpy)"
        return "system calls and libc (kernel time included)"
    if "rendezvous/" in where:
        return "relay Python code (rendezvous/)"
    if "uvloop" in where or where.endswith((".pyx", ".pxd")) or re.search(r"\bloop\.c:", where):
        return "uvloop (Cython/libuv)"
    if any(part in where for part in ("core.c", "linux.c", "stream.c", "tcp.c", "uv-common")):
        return "uvloop (Cython/libuv)"
    if "asyncio/" in where or "_asynciomodule" in where or "selectors" in where:
        return "asyncio (stdlib)"
    if "logging/" in where or "rendezvous/logs" in where:
        return "logging"
    if "libpython" in where or where.endswith((".h", ".c")) or ".py:" not in where:
        return "CPython interpreter"
    return "other Python code"


def summarize(raw: Path, title: str, seconds: float, rate: int, top: int = 25) -> str:
    """The report for one profile file."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    python_self: Counter[str] = Counter()
    total = 0
    waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if any(name in stack for name in _IGNORED_THREADS):
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = _FRAME_INLINE.match(frames[-1])
        if (leaf.group(1) if leaf else frames[-1]) in _WAITS or any(
                frame.startswith(_BLOCKED) for frame in frames):
            waiting += count
            continue
        total += count
        self_time[frames[-1]] += count
        parts[component(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
        # The innermost Python frame: which line of Python the time is spent under.
        for frame in reversed(frames):
            if ".py:" in frame:
                python_self[frame] += count
                break
    if total == 0:
        return f"{title}\n(no samples: the process was idle or py-spy could not read it)\n"
    busy = total / (seconds * rate)
    out = [
        title,
        f"{total} samples of work in {seconds:.1f} s at {rate} Hz: the process was busy about "
        f"{100 * min(busy, 1.0):.0f}% of the time ({waiting} more samples waited in epoll or "
        "sleep and are left out; py-spy records few idle samples). Percentages below are of "
        "the busy samples.",
        "",
        "Self time by component:",
    ]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in parts.most_common()]
    out += ["", f"Top {top} frames by self time (where the CPU goes):"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in self_time.most_common(top)]
    out += ["", f"Top {top} Python lines under which the time is spent (innermost Python frame):"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in python_self.most_common(top)]
    out += ["", f"Top {top + 15} frames by inclusive time (frames on >= 97% of stacks left out):"]
    shown = [(f, n) for f, n in inclusive.most_common() if n < 0.97 * total]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in shown[: top + 15]]
    return "\n".join(out) + "\n"
