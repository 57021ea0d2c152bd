"""What to do with a request head: park a hidden server, pair a mobile client, or refuse.

Diagnostics and status codes are node-rendezvous's, to the byte (docs/protocol.md §1-2).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from rendezvous.protocol.digest import basic_credentials, digest_username
from rendezvous.protocol.head import RequestHead

CONNECT_SCHEME = "uuid:"
DIAG_BAD_SCHEME = "invalid protocol, should be uuid:"
DIAG_NO_RESPONSE = "missing response parameter"
DIAG_EARLY_DATA = "wait for response to CONNECT before sending data"
DIAG_INVALID = "invalid request"
DIAG_BAD_AUTH = "invalid Authorization header"
DIAG_NOT_REGISTERED = "UUID not registered"
DIAG_TOO_MANY = "too many attempts"
DIAG_MISDIRECTED = "Host does not match the TLS server name (SNI) of this connection"


@dataclass(frozen=True, slots=True)
class Park:
    """A hidden server asks to park a connection for ``uuid``, proving itself with ``token``."""

    uuid: str
    token: str
    # ``&proxy=1`` or ``&proxy=2``: start each pairing with a PROXY header (that version) naming
    # the visitor, for a local service that speaks it; 0 for none.
    proxy: int = 0


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
    proxy = _query_value(query, "proxy")
    return Park(uuid, token, 2 if proxy == "2" else 1 if proxy == "1" else 0)


def _query_value(query: str, name: str) -> str | None:
    """The first value of ``name`` in ``query``, as ``parse_qs(query, keep_blank_values=True)``
    gives it, without building the whole dict (a CONNECT is routed by two of its fields)."""
    for field in query.split("&"):
        if not field:
            continue
        key, _, value = field.partition("=")
        if unquote(key.replace("+", " ")) == name:
            return unquote(value.replace("+", " "))
    return None


def authorization_username(value: bytes) -> str | None:
    """The user name of a Digest or Basic ``Authorization`` header, or None if malformed."""
    scheme, _, rest = value.decode("latin-1").strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "digest":
        return digest_username(rest) or None
    if scheme == "basic":
        credentials = basic_credentials(rest)
        return credentials[0] or None if credentials is not None else None
    return None
