"""The relay's responses: the bytes the server writes, exactly as node-rendezvous wrote them
(docs/protocol.md), and the reading side the agents use on them (:func:`parse_response_head`,
:attr:`ResponseHead.retry_after`, :func:`relay_diagnostic`), so what one writes the other reads.
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass
from http import HTTPStatus

from rendezvous.protocol.digest import OPAQUE, REALM

__all__ = [
    "MAX_ERROR_BODY",
    "MAX_RESPONSE_HEAD",
    "MAX_RETRY_AFTER",
    "OPAQUE",
    "PARKED",
    "REALM",
    "ResponseHead",
    "bare_error",
    "challenge",
    "error_body",
    "error_text",
    "full_error",
    "may_be_relay_error",
    "parse_response_head",
    "relay_diagnostic",
    "status_only",
]

# The relay's error bodies are under 200 bytes; a longer body is never one of them.
MAX_ERROR_BODY = 4096
# A hidden server's response head may carry more (cookies) than a client's request head; one
# longer than this is not followed (relay) or inspected for a relay error (tunnel).
MAX_RESPONSE_HEAD = 64 * 1024
# A Retry-After beyond this is a broken relay, not advice to wait for days.
MAX_RETRY_AFTER = 3600.0

PARKED = b"HTTP/1.1 200\r\n\r\n"


def error_body(diagnostic: str, permanent: bool = False) -> bytes:
    """The JSON body of every error: ``{"error":{"permanent":...,"diagnostic":...}}``."""
    document = {"error": {"permanent": permanent, "diagnostic": diagnostic}}
    return json.dumps(document, separators=(",", ":")).encode()


def bare_error(
    status: int, diagnostic: str, permanent: bool = False, extra: bytes = b""
) -> bytes:
    """The original's terse form (CONNECT and Upgrade requests): status line with no reason,
    no framing headers, the JSON body; the connection closes after it."""
    return b"HTTP/1.1 %d\r\n%s\r\n%s" % (status, extra, error_body(diagnostic, permanent))


def full_error(
    status: int, diagnostic: str, permanent: bool = False, close: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A complete framed HTTP response for plain requests, which may keep the connection;
    ``extra`` is header lines to add (``Retry-After: 30\\r\\n``)."""
    body = error_body(diagnostic, permanent)
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
            extra,
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        ]
    )


def _authenticate_header(nonce: str | None) -> bytes:
    nonce = nonce or secrets.token_hex(16)
    return (
        f'WWW-Authenticate: Digest realm="{REALM}", qop="auth, auth-int", '
        f'nonce="{nonce}", opaque="{OPAQUE}"\r\n'
    ).encode()


def challenge(upgrade: bool, close: bool, nonce: str | None = None,
              authenticate: bytes | None = None) -> bytes:
    """The 401 Digest challenge that tells a mobile client to name its hidden server.

    ``authenticate`` replaces the original's ``WWW-Authenticate`` line (the visitor check offers
    SHA-256 and MD5 in two lines).
    """
    header = authenticate or _authenticate_header(nonce)
    if upgrade:
        return b"HTTP/1.1 401\r\n" + header + b"\r\n"
    return b"".join(
        [
            b"HTTP/1.1 401 Unauthorized\r\n",
            header,
            b"Content-Length: 0\r\n",
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
        ]
    )


@functools.lru_cache(maxsize=64)  # (the relay makes its 503 at every accept, unsent)
def status_only(status: int) -> bytes:
    """A bodiless closing response for limit breaches (408, 431, 503)."""
    phrase = HTTPStatus(status).phrase.encode()
    return b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (status, phrase)


# The reading side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A response's status line and headers, as far as the agents need them."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def content_length(self) -> int | None:
        """The declared body length, or None when absent or unparseable."""
        value = (self.header("content-length") or "").strip()
        return int(value) if value.isdigit() else None

    @property
    def closes(self) -> bool:
        """The server closes the connection after this response."""
        return "close" in (self.header("connection") or "").lower()

    @property
    def retry_after(self) -> float | None:
        """``Retry-After`` in seconds (0 to MAX_RETRY_AFTER), or None when absent or not a
        number (the relay sends delay-seconds, never an HTTP date)."""
        value = self.header("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            return None
        if seconds != seconds:  # NaN
            return None
        return min(MAX_RETRY_AFTER, max(0.0, seconds))


def parse_response_head(data: bytes) -> ResponseHead | None:
    """Parse a response head (its blank line optional); None when it is not HTTP/1.x."""
    lines = data.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        return None
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            return None
        headers.append((name.strip(), value.strip()))
    return ResponseHead(int(code), reason.strip(), tuple(headers))


def relay_diagnostic(status: int, body: bytes) -> str | None:
    """The diagnostic when ``body`` is the relay's own JSON error body, else None.

    Only the exact bytes :func:`error_body` writes count, so a hidden server's JSON error is
    not mistaken for the relay's.
    """
    if status < 400 or len(body) > MAX_ERROR_BODY:
        return None
    try:
        document = json.loads(body)
        error = document["error"]
        diagnostic, permanent = error["diagnostic"], error["permanent"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(diagnostic, str) or not isinstance(permanent, bool):
        return None
    if body != error_body(diagnostic, permanent):
        return None
    return diagnostic


def error_text(body: bytes) -> str:
    """For people: the diagnostic of a ``{"error":{"diagnostic":...}}`` body, else the body as
    one line of text (at most 200 characters)."""
    try:
        diagnostic = json.loads(body)["error"]["diagnostic"]
    except (ValueError, KeyError, TypeError):
        diagnostic = None
    if isinstance(diagnostic, str):
        return diagnostic
    return " ".join(body.decode("utf-8", "replace").split())[:200]


def may_be_relay_error(answer: ResponseHead) -> bool:
    """Whether the relay may have written this head: its full form (JSON, short, framed by
    Content-Length) or its bare one (no reason phrase, no framing; closed after the body)."""
    if answer.header("transfer-encoding") is not None:
        return False
    length = answer.content_length
    if length is not None:
        content_type = (answer.header("content-type") or "").lower()
        return length <= MAX_ERROR_BODY and content_type.startswith("application/json")
    return not answer.reason and all(n.lower() == "retry-after" for n, _ in answer.headers)
