"""One log line per event: human-readable by default, one JSON object per line on request.

Lines are written in batches (:class:`BatchingHandler`): at most one ``write`` per
:data:`FLUSH_INTERVAL`, no line held longer than that, an error at once, and all at exit. A
pairing logs three or four events, and a ``write`` call for each was a fifth of a plain
pairing's CPU.
The relay's own events (:func:`event`) skip logging's record machinery while the batching
handler is the only one (``configure_logging``); with any other handler (a test's, a library
user's) they go through ``logging`` as usual, with their fields in ``record.event_fields``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOGGER_NAME = "rendezvous"
log = logging.getLogger(LOGGER_NAME)

# At most one write of log lines per this many seconds, and no line held longer: what a crash
# that skips the exit handlers (SIGKILL, a fault in C) can lose; a Python exception flushes first.
FLUSH_INTERVAL = 0.1
# A batch this large is written at once: a burst of events never holds more in memory.
MAX_BATCH_BYTES = 64 * 1024

# The handler events go to directly, while it is the logger's only one (configure_logging).
_direct: BatchingHandler | None = None


def event(name: str, /, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event ``name`` with its fields (ID, peer, bytes, reason, ...)."""
    if log.isEnabledFor(level):
        direct = _direct
        handlers = log.handlers
        if (direct is not None and len(handlers) == 1 and handlers[0] is direct
                and level >= direct.level and not log.filters and not direct.filters):
            direct.add_event(level, name, fields)
            return
        log.log(level, name, extra={"event_fields": fields})


def flush() -> None:
    """Write out every batched line now (before exiting, or a crash's traceback)."""
    for handler in log.handlers:
        handler.flush()


class EventFormatter(logging.Formatter):
    """A formatter of events: :meth:`line` makes the line from an event's parts, for records
    (:meth:`format`) and for events that never became one (:func:`event`)."""

    def line(self, created: float, level: int, name: str, fields: dict[str, Any],
             exception: str = "") -> str:
        """The line of event ``name`` at ``level``, logged at ``created`` (time.time())."""
        raise NotImplementedError

    def format(self, record: logging.LogRecord) -> str:
        exception = ""
        if record.exc_info:
            exception = self.formatException(record.exc_info)
        return self.line(record.created, record.levelno, record.getMessage(),
                         getattr(record, "event_fields", {}), exception)


class TextFormatter(EventFormatter):
    """``2026-11-25T16:40:00Z parked id=... peer=... pool=3``

    Without ``stamp`` the time is left out: the journal stamps each line itself.
    """

    def __init__(self, stamp: bool = True) -> None:
        super().__init__()
        self.stamp = stamp
        self._stamped = (-1, "")  # (second, its stamp): most lines share one

    def line(self, created: float, level: int, name: str, fields: dict[str, Any],
             exception: str = "") -> str:
        line = name
        for key, value in fields.items():
            text = value if type(value) is str else str(value)
            # _text's common case inline (a pairing logs three lines: this was most of their
            # cost): a value that needs neither quotes nor escapes is itself.
            if not text or " " in text or "\\" in text or '"' in text or not text.isprintable():
                text = _text(text)
            line += f" {key}={text}"
        if self.stamp:
            second, stamp = self._stamped
            if int(created) != second:
                second = int(created)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
                self._stamped = (second, stamp)  # (one assignment: safe across threads)
            line = stamp + " " + line
        if exception:
            line += "\n" + exception
        return line


# Characters that could end a line, or a field, in the text format: escaped in every value,
# since peers choose many of them (user names, IDs, reasons) and fail2ban-style tools parse us.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else (
        f"\\U{code:08x}")


def _text(value: Any) -> str:
    """A field value as one token: quoted when it has spaces or quotes, or is empty;
    backslash, quote and every control or unprintable character escaped."""
    text = value if type(value) is str else str(value)
    if text.isprintable() and "\\" not in text and '"' not in text:
        return f'"{text}"' if (" " in text or not text) else text
    return '"' + "".join(_escape_char(char) for char in text) + '"'


# A run of like events (the same rejection from one address) is logged once at once, then as
# one line per this many seconds with its count, so a flood cannot write megabytes of log.
REPEAT_WINDOW = 10.0
# Runs tracked at once; events of further kinds share one summary, so memory stays bounded.
MAX_REPEAT_KEYS = 1_000
_OVERFLOW = object()


@dataclass(slots=True)
class _Run:
    name: str
    level: int
    started: float
    fields: dict[str, Any]
    count: int = 0  # events since the first, not yet logged


class RepeatedEvents:
    """Logs the first event of each key at once and then, per ``window`` seconds, one line
    with the fields of the latest and its count: ``rejected reason=... repeats=37 window=10s``.

    ``schedule(delay, callback)`` (e.g. ``loop.call_later``) makes a summary come out when its
    window ends; without it, summaries come out at a later event or :meth:`flush`.
    """

    def __init__(
        self, window: float = REPEAT_WINDOW, max_keys: int = MAX_REPEAT_KEYS, *,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self._schedule = schedule
        self._clock = clock
        self._runs: dict[Hashable, _Run] = {}
        self._next_flush = float("inf")  # when the oldest run's window ends
        self._flush_scheduled = False

    def event(self, key: Hashable, name: str, /, level: int = logging.INFO,
              **fields: Any) -> None:
        """Log ``name`` with ``fields`` now, unless an event of ``key`` was logged less than
        ``window`` seconds ago; then only count it."""
        now = self._clock()
        if now >= self._next_flush:
            self.flush(now)
        run = self._runs.get(key)
        if run is None and len(self._runs) >= self.max_keys:
            key, fields = _OVERFLOW, {"keys": f"over {self.max_keys}"}
            run = self._runs.get(key)
            if run is None:  # the overflow run is only ever summarised
                run = self._runs[key] = _Run(name, level, now, fields)
        if run is None:
            self._runs[key] = _Run(name, level, now, fields)
            self._next_flush = min(self._next_flush, now + self.window)
            event(name, level=level, **fields)
            return
        run.count += 1
        run.fields = fields
        run.level = max(run.level, level)
        if self._schedule is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            self._schedule(max(0.0, self._next_flush - now), self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()
        if self._schedule is not None and any(run.count for run in self._runs.values()):
            self._flush_scheduled = True
            self._schedule(max(0.0, self._next_flush - self._clock()), self._scheduled_flush)

    def flush(self, now: float | None = None, everything: bool = False) -> None:
        """Log the summary of every run whose window has ended (of all, with ``everything``)
        and forget those runs."""
        now = self._clock() if now is None else now
        self._next_flush = float("inf")
        for key, run in list(self._runs.items()):
            ends = run.started + self.window
            if not everything and ends > now:
                self._next_flush = min(self._next_flush, ends)
                continue
            del self._runs[key]
            if run.count:
                event(run.name, level=run.level, **run.fields, repeats=run.count,
                      window=f"{self.window:g}s")

    def __len__(self) -> int:
        return len(self._runs)


class JSONFormatter(EventFormatter):
    """``{"time": ..., "level": "info", "event": "parked", "id": ..., ...}``"""

    def line(self, created: float, level: int, name: str, fields: dict[str, Any],
             exception: str = "") -> str:
        document: dict[str, Any] = {
            "time": round(created, 3),
            "level": logging.getLevelName(level).lower(),
            "event": name,
        }
        document.update(fields)
        if exception:
            document["exception"] = exception
        return json.dumps(document, default=str)


class BatchingHandler(logging.Handler):
    """Writes its lines to ``stream`` in batches, at most one ``write`` (and flush) per
    ``interval``: a line that comes after a quiet interval is written at once (a relay at rest
    logs as it did), the lines that follow it within the interval together when it ends (a
    helper thread waits for that). A batch is written at once when it reaches
    :data:`MAX_BATCH_BYTES` or holds an error, and on :meth:`flush` (at exit too:
    logging.shutdown flushes every handler). Lines keep their order."""

    def __init__(self, stream: IO[str], interval: float = FLUSH_INTERVAL) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        self._lines: list[str] = []
        self._size = 0
        self._formatter: EventFormatter = TextFormatter()
        self._written = threading.Lock()  # held while a batch is written: batches keep order
        # Guards _lines; wakes the writer. Events take the lock itself: a Condition's own
        # ``with`` runs two Python calls more per line.
        self._lines_lock = threading.Lock()
        self._due = threading.Condition(self._lines_lock)
        self._writer: threading.Thread | None = None
        self._last_write = -float("inf")  # time.monotonic() of the last write
        self._closed = False

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self._formatter = fmt if isinstance(fmt, EventFormatter) else TextFormatter()

    def add_event(self, level: int, name: str, fields: dict[str, Any]) -> None:
        """Batch the line of an event that never became a record (logs.event)."""
        self._add(self._formatter.line(time.time(), level, name, fields), level)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def _add(self, line: str, level: int) -> None:
        with self._lines_lock:
            lines = self._lines
            lines.append(line)
            self._size += len(line)
            first = len(lines) == 1
            now = (level >= logging.ERROR or self._size >= MAX_BATCH_BYTES or self._closed
                   or (first and time.monotonic() - self._last_write >= self.interval))
            if first and not now:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_batches, daemon=True,
                                                    name="rendezvous-log-writer")
                    self._writer.start()
                self._due.notify()
        if now:
            self.flush()

    def _write_batches(self) -> None:
        """The helper thread: write each batch ``interval`` after the write before it."""
        while True:
            with self._due:
                while not self._lines and not self._closed:
                    self._due.wait()
                if self._closed:
                    return
                delay = self._last_write + self.interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.flush()

    def flush(self) -> None:
        """Write every batched line now."""
        with self._written:
            with self._lines_lock:
                lines, self._lines, self._size = self._lines, [], 0
            if not lines:
                return
            self._last_write = time.monotonic()
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except Exception:  # (a full disk, a closed pipe): the relay goes on, as logging's
                if logging.raiseExceptions:  # own handlers do, saying so where it can
                    with contextlib.suppress(Exception):
                        sys.stderr.write("--- rendezvous: writing log lines failed\n")

    def close(self) -> None:
        self.flush()
        with self._due:
            self._closed = True
            self._due.notify()
        super().close()


class ReopeningFileHandler(BatchingHandler):
    """Appends batched lines to a file and opens it again on :meth:`reopen` (SIGHUP, after
    logrotate moved it away): a line is never lost between the move and the reopen, it lands
    in the old file."""

    def __init__(self, filename: Path | str, encoding: str = "utf-8") -> None:
        self.baseFilename = os.path.abspath(filename)
        self.encoding = encoding
        super().__init__(open(self.baseFilename, "a", encoding=encoding))  # noqa: SIM115

    def reopen(self) -> None:
        stream = open(self.baseFilename, "a", encoding=self.encoding)  # noqa: SIM115
        with self._written:  # what was batched goes to the old file, then the new one is used
            with self._lines_lock:
                lines, self._lines, self._size = self._lines, [], 0
            old, self.stream = self.stream, stream
            try:
                if lines:
                    old.write("\n".join(lines) + "\n")
            finally:
                old.close()

    def close(self) -> None:
        super().close()
        with self._written:
            self.stream.close()


def level_number(name: str) -> int:
    """The logging level called ``name`` ("debug", "info", "warning", "error")."""
    number = logging.getLevelName(name.upper())
    return number if isinstance(number, int) else logging.INFO


def stderr_is_journal() -> bool:
    """Whether stderr is connected to systemd's journal (``$JOURNAL_STREAM`` names it)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(sys.stderr.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def configure_logging(log_format: str = "text", level: int = logging.INFO,
                      log_file: Path | None = None) -> None:
    """Send the package's events to stderr, or to ``log_file``, in ``log_format`` ("text" or
    "json"). Text lines on the journal carry no time stamp of their own.

    Raises :class:`OSError` when ``log_file`` cannot be opened.
    """
    global _direct
    handler: BatchingHandler
    if log_file is not None:
        handler = ReopeningFileHandler(log_file, encoding="utf-8")
    else:
        handler = BatchingHandler(sys.stderr)  # (not closed with the handler)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter(stamp=log_file is not None or not stderr_is_journal()))
    for old in log.handlers:
        old.close()
    log.handlers[:] = [handler]
    _direct = handler
    log.setLevel(level)
    log.propagate = False


def reopen_log_files() -> bool:
    """Open the log file again (SIGHUP); False when logging goes to stderr or the reopen failed
    (the old file is kept, and the failure is logged to it)."""
    reopened = False
    for handler in log.handlers:
        if isinstance(handler, ReopeningFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                event("log file reopen failed, keeping the old one", level=logging.ERROR,
                      file=handler.baseFilename, error=str(exc))
                continue
            reopened = True
    return reopened
