"""The CONNECT token check (protocol/totp.py) against pyotp and RFC 6238's own test vectors."""

from __future__ import annotations

import base64
import random

import pyotp

from rendezvous.protocol import totp
from rendezvous.protocol.totp import current_token, token_is_valid
from rendezvous.registry.base import new_secret

# RFC 6238 appendix B, HMAC-SHA1: the ASCII key "12345678901234567890", 8 digits, 30 s steps.
RFC_KEY = base64.b32encode(b"12345678901234567890").decode("ascii")
RFC_VECTORS = [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
               (1234567890, "89005924"), (2000000000, "69279037")]


def pyotp_says(base32: str, step: int, token: str, now: float) -> bool:
    try:
        return bool(pyotp.TOTP(base32, digits=len(token), interval=step).verify(
            token, for_time=now, valid_window=1))
    except (ValueError, TypeError):
        return False


def test_rfc_6238_vectors_and_one_step_of_skew_either_way() -> None:
    for moment, code in RFC_VECTORS:
        assert token_is_valid(RFC_KEY, 30, code, moment)
        assert token_is_valid(RFC_KEY, 30, code, moment + 30)  # the previous step's code
        assert token_is_valid(RFC_KEY, 30, code, moment - 30)  # the next step's
        assert not token_is_valid(RFC_KEY, 30, code, moment + 60)
        assert not token_is_valid(RFC_KEY, 30, code, moment - 60)
        assert token_is_valid(RFC_KEY, 30, code[2:], moment)  # 6 digits: the last six


def test_agrees_with_pyotp_on_random_secrets_times_and_tokens() -> None:
    rng = random.Random(15)
    for i in range(400):
        secret = new_secret() if i % 3 else new_secret().lower()
        step = rng.choice([1, 7, 30, 60])
        digits = rng.choice([6, 7, 8])
        now = rng.uniform(0, 2e9)
        shift = rng.choice([-2, -1, 0, 1, 2]) * step
        token = pyotp.TOTP(secret, digits=digits, interval=step).at(now + shift)
        if i % 4 == 0:
            token = str(rng.randrange(10**digits)).zfill(digits)
        assert token_is_valid(secret, step, token, now) == pyotp_says(secret, step, token, now)
        assert token_is_valid(secret, step, current_token(secret, step, digits, now), now)


def test_corrupt_secrets_steps_and_tokens_check_nothing() -> None:
    good = new_secret()
    token = current_token(good, 30, 6)
    short = base64.b32encode(b"0123456789").decode()  # 80 bits: pyotp refuses it too
    for secret in ("", "!!!!", "A" * 9, short):
        assert not token_is_valid(secret, 30, token)
        assert not pyotp_says(secret, 30, token, 1e9)
    assert not token_is_valid(good, 0, token)
    assert not token_is_valid(good, -30, token)
    assert not token_is_valid(good, 30, token, now=-1.0)
    for bad in ("12345", "123456789", "12345a", "١٢٣٤٥٦", ""):  # length, letters, not ASCII
        assert not token_is_valid(good, 30, bad)
    assert token_is_valid(good, 30, token)


def test_the_caches_stay_bounded() -> None:
    for _ in range(totp.CACHED_SECRETS + 50):
        token_is_valid(new_secret(), 30, "123456")
    assert totp._key.cache_info().currsize <= totp.CACHED_SECRETS
    assert totp._window.cache_info().currsize <= totp.CACHED_SECRETS
