"""Checking a hidden server's CONNECT token (RFC 6238 TOTP, HMAC-SHA1)."""

from __future__ import annotations

import time

import pyotp

# Codes shorter than 6 digits are refused, as node-rendezvous did (docs/protocol.md §1); RFC 4226
# stops at 8. Provisioning files, the CLI and the admin page offer the same range.
MIN_DIGITS = 6
MAX_DIGITS = 8
# Accept the previous and next step as well as the current one: hidden servers' clocks drift.
SKEW_STEPS = 1


def token_is_valid(base32: str, step: int, token: str, now: float | None = None) -> bool:
    """True if ``token`` is the TOTP code of ``base32`` within one step of ``now``.

    The token's length picks the digit count (6 to 8), as node-rendezvous did.
    """
    if not (MIN_DIGITS <= len(token) <= MAX_DIGITS and token.isascii() and token.isdigit()):
        return False
    try:
        totp = pyotp.TOTP(base32, digits=len(token), interval=step)
        return bool(totp.verify(token, for_time=now if now is not None else time.time(),
                                valid_window=SKEW_STEPS))
    except (ValueError, TypeError):  # a corrupt secret in the registry
        return False


def current_token(base32: str, step: int, digits: int, now: float | None = None) -> str:
    """The code a hidden server sends now."""
    totp = pyotp.TOTP(base32, digits=digits, interval=step)
    return str(totp.at(now if now is not None else time.time()))
