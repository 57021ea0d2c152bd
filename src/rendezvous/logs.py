"""One log line per event: human-readable by default, one JSON object per line on request."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "rendezvous"
log = logging.getLogger(LOGGER_NAME)


def event(name: str, /, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event ``name`` with its fields (ID, peer, bytes, reason, ...)."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={"event_fields": fields})


class TextFormatter(logging.Formatter):
    """``2026-11-25T16:40:00Z parked id=... peer=... pool=3``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        fields: dict[str, Any] = getattr(record, "event_fields", {})
        parts = [stamp, record.getMessage()]
        parts.extend(f"{key}={_text(value)}" for key, value in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


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


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send the package's events to stderr in ``log_format`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
