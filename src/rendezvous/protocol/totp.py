"""Checking a hidden server's CONNECT token (RFC 6238 TOTP, HMAC-SHA1).

The check is RFC 4226's HOTP over the decoded key, as pyotp computes it (tests compare the
two), with the key and each time step's codes kept: a relay checks one ID's token thousands of
times per step, and base32 decoding plus three HMACs were most of a token check.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import time

import pyotp

# Codes shorter than 6 digits are refused, as node-rendezvous did (docs/protocol.md §1); RFC 4226
# stops at 8. Provisioning files, the CLI and the admin page offer the same range.
MIN_DIGITS = 6
MAX_DIGITS = 8
# Accept the previous and next step as well as the current one: hidden servers' clocks drift.
SKEW_STEPS = 1
# Secrets shorter than this are refused, as pyotp does (NIST SP 800-63B); ours have 160 bits.
MIN_SECRET_BITS = 112
# Decoded keys, and the codes of one step per (key, digits), kept for this many secrets: more
# than a relay's active IDs, and each is under a hundred bytes.
CACHED_SECRETS = 4096


@functools.lru_cache(maxsize=CACHED_SECRETS)
def _key(base32: str) -> bytes | None:
    """The HMAC key of a base32 secret (padding optional, any case), or None if corrupt."""
    try:
        key = base64.b32decode(base32 + "=" * (-len(base32) % 8), casefold=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) * 8 >= MIN_SECRET_BITS else None


def _code(key: bytes, counter: int, digits: int) -> str:
    """RFC 4226's HOTP value of ``key`` at ``counter``, ``digits`` long."""
    digest = hmac.digest(key, counter.to_bytes(8, "big"), "sha1")
    offset = digest[-1] & 0x0F
    value = int.from_bytes(digest[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


@functools.lru_cache(maxsize=CACHED_SECRETS)
def _window(base32: str, digits: int, counter: int) -> tuple[bytes, ...]:
    """The codes accepted at time step ``counter``: its own first, then the skew steps'."""
    key = _key(base32)
    if key is None:
        return ()
    counters = [counter] + [counter + sign * n for n in range(1, SKEW_STEPS + 1)
                            for sign in (-1, 1)]
    return tuple(_code(key, c, digits).encode("ascii") for c in counters if c >= 0)


def token_is_valid(base32: str, step: int, token: str, now: float | None = None) -> bool:
    """True if ``token`` is the TOTP code of ``base32`` within one step of ``now``.

    The token's length picks the digit count (6 to 8), as node-rendezvous did. A corrupt
    secret or step in the registry checks nothing.
    """
    if not (MIN_DIGITS <= len(token) <= MAX_DIGITS and token.isascii() and token.isdigit()):
        return False
    if type(step) is not int or step <= 0:
        return False
    moment = time.time() if now is None else now
    if moment < 0:
        return False
    given = token.encode("ascii")
    # Every accepted code compared in constant time; which one matched does not matter.
    return any([hmac.compare_digest(given, code)
                for code in _window(base32, len(token), int(moment) // step)])


def current_token(base32: str, step: int, digits: int, now: float | None = None) -> str:
    """The code a hidden server sends now."""
    totp = pyotp.TOTP(base32, digits=digits, interval=step)
    return str(totp.at(now if now is not None else time.time()))
