"""The bytes the server writes, exactly as node-rendezvous wrote them (PROTOCOL.md)."""

from __future__ import annotations

import hashlib
import json
import secrets
from http import HTTPStatus

# The original's opaque is always md5("rendezvous"); clients may compare it.
OPAQUE = hashlib.md5(b"rendezvous").hexdigest()
REALM = "rendezvous"

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
    status: int, diagnostic: str, permanent: bool = False, close: bool = False
) -> bytes:
    """A complete framed HTTP response for plain requests, which may keep the connection."""
    body = error_body(diagnostic, permanent)
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
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


def status_only(status: int) -> bytes:
    """A bodiless closing response for limit breaches (408, 431, 503)."""
    phrase = HTTPStatus(status).phrase.encode()
    return b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (status, phrase)
