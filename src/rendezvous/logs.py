"""One log line per event: human-readable by default, one JSON object per line on request."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOGGER_NAME = "rendezvous"
log = logging.getLogger(LOGGER_NAME)


def event(name: str, /, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event ``name`` with its fields (ID, peer, bytes, reason, ...)."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={"event_fields": fields})


class TextFormatter(logging.Formatter):
    """``2026-11-25T16:40:00Z parked id=... peer=... pool=3``

    Without ``stamp`` the time is left out: the journal stamps each line itself.
    """

    def __init__(self, stamp: bool = True) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "event_fields", {})
        parts = [record.getMessage()]
        if self.stamp:
            parts.insert(0, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)))
        parts.extend(f"{key}={_text(value)}" for key, value in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
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
    text = str(value)
    if text.isprintable() and not any(char in text for char in '\\"'):
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


class JSONFormatter(logging.Formatter):
    """``{"time": ..., "level": "info", "event": "parked", "id": ..., ...}``"""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        document.update(getattr(record, "event_fields", {}))
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class ReopeningFileHandler(logging.FileHandler):
    """Appends to a file and opens it again on :meth:`reopen` (SIGHUP, after logrotate moved
    it away): a line is never lost between the move and the reopen, it lands in the old file."""

    def reopen(self) -> None:
        self.acquire()
        try:
            stream = open(self.baseFilename, "a", encoding=self.encoding)  # noqa: SIM115
            old, self.stream = self.stream, stream
            if old is not None:
                old.close()
        finally:
            self.release()


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
    handler: logging.Handler
    if log_file is not None:
        handler = ReopeningFileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter(stamp=log_file is not None or not stderr_is_journal()))
    for old in log.handlers:
        old.close()
    log.handlers[:] = [handler]
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
