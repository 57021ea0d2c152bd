"""What to do with a request head: park a hidden server, pair a mobile client, or refuse.

Diagnostics and status codes are node-rendezvous's, to the byte (PROTOCOL.md §1-2).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import parse_qs
from urllib.request import parse_http_list, parse_keqv_list

from rendezvous.protocol.head import RequestHead

CONNECT_SCHEME = "uuid:"
DIAG_BAD_SCHEME = "invalid protocol, should be uuid:"
DIAG_NO_RESPONSE = "missing response parameter"
DIAG_EARLY_DATA = "wait for response to CONNECT before sending data"
DIAG_INVALID = "invalid request"
DIAG_BAD_AUTH = "invalid Authorization header"
DIAG_NOT_REGISTERED = "UUID not registered"
DIAG_TOO_MANY = "too many attempts"


@dataclass(frozen=True, slots=True)
class Park:
    """A hidden server asks to park a connection for ``uuid``, proving itself with ``token``."""

    uuid: str
    token: str


@dataclass(frozen=True, slots=True)
class Pair:
    """A mobile client asks to be paired with a parked connection of ``uuid``."""

    uuid: str


@dataclass(frozen=True, slots=True)
class Challenge:
    """A mobile client named no hidden server: answer 401 with a Digest challenge."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer ``status`` with the JSON error body."""

    status: int
    diagnostic: str
    permanent: bool = False


Decision = Park | Pair | Challenge | Refuse


def route(head: RequestHead) -> Decision:
    """Decide what a request head asks for. Never raises on peer input."""
    if head.method == "CONNECT":
        return _route_connect(head.target)
    authorization = head.header(b"authorization")
    if authorization is not None:
        uuid = authorization_username(authorization)
        if not uuid:
            return Refuse(400, DIAG_BAD_AUTH, permanent=True)
        return Pair(uuid)
    if head.is_upgrade:
        # The query alone: a full URL parse would raise on a malformed authority.
        uuid = _query_value(head.target.partition("?")[2].partition("#")[0], "rendezvous")
        if uuid:
            return Pair(uuid)
    return Challenge()


def _route_connect(target: str) -> Decision:
    if not target.startswith(CONNECT_SCHEME):
        return Refuse(403, DIAG_BAD_SCHEME)
    uuid, _, query = target[len(CONNECT_SCHEME) :].partition("?")
    token = _query_value(query, "response")
    if token is None:
        return Refuse(407, DIAG_NO_RESPONSE)
    return Park(uuid, token)


def _query_value(query: str, name: str) -> str | None:
    values = parse_qs(query, keep_blank_values=True).get(name)
    return values[0] if values else None


def authorization_username(value: bytes) -> str | None:
    """The user name of a Digest or Basic ``Authorization`` header, or None if malformed."""
    try:
        text = value.decode("latin-1").strip()
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    scheme, _, rest = text.partition(" ")
    scheme = scheme.lower()
    if scheme == "digest":
        try:
            fields = parse_keqv_list(parse_http_list(rest))
        except (ValueError, IndexError):  # e.g. 'username=' with no value at all
            return None
        username = fields.get("username")
        return username or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):  # binascii.Error, or non-ASCII input
            return None
        username, colon, _ = decoded.partition(":")
        return username if colon and username else None
    return None
