"""HTTP Digest and Basic (RFC 7616, RFC 7617): the relay's visitor check, and the client side.

The server side is the optional visitor check.

By default the relay only reads the user name of a mobile client's Digest or Basic credentials
(node-rendezvous's behaviour). An entry may carry a *visitor password*; then the relay checks
the client's Digest response (or Basic password) before pairing, so strangers who merely know the
ID never reach the hidden server.

Nonces are stateless to issue: a timestamp and an HMAC of it under a server key, 32 hex digits
like the original's. A response is accepted only for a fresh nonce (``NONCE_LIFETIME``) and a
nonce count not seen before with that nonce (replay protection; counts may arrive out of order
by up to ``NONCE_COUNT_WINDOW``, as a client's concurrent requests on one nonce race each other),
and only for the request it was computed for: its ``uri`` must be the request target
(RFC 7616 §3.4.6).

The client side (:func:`digest_authorization`, :func:`basic_authorization`) is what the mobile
tunnel sends to name its hidden server; tests check it against the server side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from urllib.request import parse_http_list, parse_keqv_list

REALM = "rendezvous"
# The original's opaque is always md5("rendezvous"); clients may compare it.
OPAQUE = hashlib.md5(REALM.encode()).hexdigest()
NONCE_LIFETIME = 300.0  # seconds a nonce may be used
MAX_TRACKED_NONCES = 100_000  # nonce-count memory bound; the oldest are forgotten first
# A count this far below the highest seen is refused unseen: the window of counts remembered.
NONCE_COUNT_WINDOW = 64

_WINDOW_MASK = (1 << NONCE_COUNT_WINDOW) - 1

_ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def _hash(algorithm: str, text: str) -> str:
    return _ALGORITHMS[algorithm](text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class VisitorSecret:
    """What the registry keeps of a visitor password: its Digest HA1 in each algorithm
    (``H(ID:realm:password)``), never the password itself."""

    md5: str
    sha256: str

    @classmethod
    def from_password(cls, uuid: str, password: str) -> VisitorSecret:
        """The secret for visitors of ``uuid`` who log in with ``password``."""
        text = f"{uuid}:{REALM}:{password}"
        return cls(md5=_hash("MD5", text), sha256=_hash("SHA-256", text))

    def ha1(self, algorithm: str) -> str:
        return self.md5 if algorithm == "MD5" else self.sha256


class NonceBook:
    """Issues nonces and accepts each (nonce, count) at most once while the nonce is fresh."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        # nonce -> (highest count seen, bit i set: count highest - 1 - i seen), in first use order
        self._counts: dict[str, tuple[int, int]] = {}

    def issue(self, now: float | None = None) -> str:
        """A fresh nonce, unique to its challenge: 8 hex digits of time, 8 random, 16 of HMAC
        over both (so no state is kept for nonces issued but never used)."""
        stamp = f"{int(now if now is not None else time.time()) & 0xFFFFFFFF:08x}"
        stamp += secrets.token_hex(4)
        return stamp + self._mac(stamp)

    def _mac(self, stamp: str) -> str:
        return hmac.new(self._key, stamp.encode(), hashlib.sha256).hexdigest()[:16]

    def check(self, nonce: str, count: str, now: float | None = None) -> str:
        """"ok", "stale" (expired: the client may retry with a new one) or "invalid"."""
        now = now if now is not None else time.time()
        stamp, mac = nonce[:16], nonce[16:]
        if len(nonce) != 32 or not hmac.compare_digest(mac, self._mac(stamp)):
            return "invalid"
        try:
            issued, number = int(stamp[:8], 16), int(count, 16)
        except ValueError:
            return "invalid"
        if not 0 <= now - issued <= NONCE_LIFETIME:
            return "stale"
        if number < 1:
            return "invalid"
        seen = self._counts.get(nonce)
        if seen is None:
            if len(self._counts) >= MAX_TRACKED_NONCES:
                self._counts.pop(next(iter(self._counts)))
            self._counts[nonce] = (number, 0)
            return "ok"
        highest, below = seen
        if number > highest:  # the usual case: the next count
            shift = number - highest
            below = ((below << shift) | (1 << (shift - 1))) & _WINDOW_MASK
            self._counts[nonce] = (number, below)
            return "ok"
        back = highest - number  # 0: the highest itself, a replay
        if back == 0 or back > NONCE_COUNT_WINDOW or below >> (back - 1) & 1:
            return "invalid"  # a replayed response, or one too old to tell
        self._counts[nonce] = (highest, below | 1 << (back - 1))
        return "ok"


def basic_credentials(rest: str) -> tuple[str, str] | None:
    """(user, password) of a Basic ``Authorization`` value (after the scheme), or None if it
    is not valid base64 of ``user:password``."""
    try:
        decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):  # binascii.Error, or non-ASCII input
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def split_http_list(text: str) -> list[str]:
    """urllib's ``parse_http_list`` (the comma-separated elements, quoted strings kept whole),
    without its loop over every character when ``text`` has no backslash (no escapes, so the
    quotes alone say where commas count): every Digest header a client sends. Routing reads
    one per request."""
    if "\\" in text:
        return parse_http_list(text)
    segments = text.split('"')  # the odd ones are quoted
    if not any("," in quoted for quoted in segments[1::2]):
        # The usual header: every comma separates (a split in C, 14 -> 3 us for a Digest one).
        found = text.split(",")
        if not found[-1]:  # (an empty last element is dropped, a blank one kept, as urllib)
            found.pop()
        return [part.strip() for part in found]
    found = []
    current = ""
    for index, segment in enumerate(segments):
        if index:
            current += '"'
        if index % 2:  # inside a quoted string: commas are part of it
            current += segment
            continue
        first, *others = segment.split(",")
        current += first
        for piece in others:
            found.append(current)
            current = piece
    if current:
        found.append(current)
    return [part.strip() for part in found]


def digest_fields(rest: str) -> dict[str, str] | None:
    """The ``name=value`` fields of a Digest ``Authorization`` value, or None if malformed."""
    try:
        return parse_keqv_list(split_http_list(rest))
    except (ValueError, IndexError):  # e.g. 'username=' with no value at all
        return None


# A Digest value in the shape clients send: ASCII, name=value fields split by commas, each
# value a token or a quoted string with no comma or backslash in it. For such a value the
# fields are plain to see: one scan in C checks the shape, and the user name is found without
# building every field (routing reads it for each request).
_SPACE = r"[\t-\r\x1c-\x20]"  # what str.strip() strips, in ASCII
_PLAIN_FIELD = r'[^\t-\r\x1c-\x20=,"\\]++=(?:"[^"\\,]*+"|[^\t-\r\x1c-\x20",\\]++)'
_PLAIN_FIELDS = re.compile(
    rf"{_SPACE}*+{_PLAIN_FIELD}(?:{_SPACE}*+,{_SPACE}*+{_PLAIN_FIELD})*+{_SPACE}*+")
_SPACES = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def digest_username(rest: str) -> str | None:
    """The ``username`` field of a Digest ``Authorization`` value, or None if the value is
    malformed or has none: ``digest_fields(rest).get("username")``, faster."""
    if not (rest.isascii() and _PLAIN_FIELDS.fullmatch(rest)):
        fields = digest_fields(rest)
        return fields.get("username") if fields is not None else None
    # The last field named username (as in a dict of the fields): "username=" where a field
    # starts, at the start or after a comma (a quoted value holds none) and spaces.
    end = len(rest)
    while True:
        at = rest.rfind("username=", 0, end)
        if at < 0:
            return None
        before = rest[:at].rstrip(_SPACES)
        if not before or before[-1] == ",":
            break
        end = at
    value = at + len("username=")
    if rest.startswith('"', value):
        return rest[value + 1:rest.index('"', value + 1)]
    comma = rest.find(",", value)
    return rest[value:comma if comma >= 0 else len(rest)].rstrip(_SPACES)


def challenge_headers(nonces: NonceBook, stale: bool = False) -> bytes:
    """``WWW-Authenticate`` lines offering SHA-256 and MD5, for an entry with a visitor
    password (RFC 7616 §3.7: the preferred algorithm first)."""
    lines = [
        f'WWW-Authenticate: Digest realm="{REALM}", qop="auth", algorithm={algorithm}, '
        f'nonce="{nonces.issue()}", opaque="{OPAQUE}"{", stale=true" if stale else ""}\r\n'
        for algorithm in ("SHA-256", "MD5")
    ]
    return "".join(lines).encode()


def verify(authorization: bytes, method: str, uuid: str, secret: VisitorSecret,
           nonces: NonceBook, *, target: str) -> str:
    """Check a mobile client's credentials for its request ``method`` ``target`` against
    ``secret``: "ok", "stale" or "invalid"."""
    text = authorization.decode("latin-1").strip()
    scheme, _, rest = text.partition(" ")
    if scheme.lower() == "basic":
        credentials = basic_credentials(rest)
        if credentials is None:
            return "invalid"
        user, password = credentials
        expected = VisitorSecret.from_password(uuid, password).md5
        return "ok" if user == uuid and hmac.compare_digest(expected, secret.md5) else "invalid"
    fields = digest_fields(rest) if scheme.lower() == "digest" else None
    if fields is None:
        return "invalid"
    algorithm = fields.get("algorithm", "MD5").upper()
    required = ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
    if (algorithm not in _ALGORITHMS or any(name not in fields for name in required)
            or fields["qop"] != "auth" or fields["username"] != uuid or fields["realm"] != REALM
            or not uri_matches(fields["uri"], target)):
        return "invalid"  # a response computed for another request is no proof for this one
    ha2 = _hash(algorithm, f"{method}:{fields['uri']}")
    expected = _hash(algorithm, ":".join(
        [secret.ha1(algorithm), fields["nonce"], fields["nc"], fields["cnonce"], "auth", ha2]))
    if not hmac.compare_digest(expected, fields["response"].lower()):
        return "invalid"
    return nonces.check(fields["nonce"], fields["nc"])


def uri_matches(uri: str, target: str) -> bool:
    """Whether a Digest ``uri`` names the request ``target`` (RFC 7616 §3.4.6): the same
    string, or the origin form (path and query) of an absolute-form target."""
    if uri == target:
        return True
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme.isalpha():
        return False
    path = rest[len(rest.split("/", 1)[0]):]  # after the authority
    return uri == (path or "/")


# The client side ---------------------------------------------------------------------------


def digest_authorization(
    challenge: str, username: str, password: str, method: str, uri: str, cnonce: str | None = None
) -> str | None:
    """The ``Authorization`` value answering a ``WWW-Authenticate: Digest ...`` challenge
    (RFC 7616: MD5, MD5-sess, SHA-256 and SHA-256-sess; ``qop=auth`` when offered).

    None when ``challenge`` is not a Digest challenge with a nonce.
    """
    scheme, _, rest = challenge.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params = digest_fields(rest)
    if params is None:
        return None
    realm, nonce = params.get("realm", ""), params.get("nonce")
    if not nonce:
        return None
    algorithm = params.get("algorithm", "MD5")
    base = algorithm.upper().removesuffix("-SESS")
    if base not in _ALGORITHMS:
        return None

    def h(text: str) -> str:
        return _hash(base, text)

    cnonce = cnonce or secrets.token_hex(16)
    ha1 = h(f"{username}:{realm}:{password}")
    if algorithm.upper().endswith("-SESS"):
        ha1 = h(f"{ha1}:{nonce}:{cnonce}")
    ha2 = h(f"{method}:{uri}")
    qops = [q.strip().lower() for q in params.get("qop", "").split(",")]
    fields = [
        f'username="{_quote(username)}"',
        f'realm="{_quote(realm)}"',
        f'nonce="{_quote(nonce)}"',
        f'uri="{_quote(uri)}"',
        f"algorithm={algorithm}",
    ]
    if "auth" in qops:
        nc = "00000001"
        fields.append(f'response="{h(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")}"')
        fields += ["qop=auth", f"nc={nc}", f'cnonce="{cnonce}"']
    else:
        fields.append(f'response="{h(f"{ha1}:{nonce}:{ha2}")}"')
    if "opaque" in params:
        fields.append(f'opaque="{_quote(params["opaque"])}"')
    return "Digest " + ", ".join(fields)


def basic_authorization(username: str, password: str) -> str:
    """``Basic base64(username:password)``."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
