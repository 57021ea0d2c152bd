"""Limits on failed CONNECTs, so a TOTP code cannot be guessed at line speed.

Token buckets keyed by source address and by hidden-server ID: every failed CONNECT takes a
token; with none left, CONNECTs from that address (or for that ID) get 429 and ``Retry-After``
without the token being checked, so no guess is spent. Successes cost nothing.

An attacker exhausting an ID's bucket must not lock out the real hidden server, so an address
that parked successfully for an ID recently is *trusted* for that ID and skips the ID's bucket
(it still has its own address bucket, which only its own failures drain).
"""

from __future__ import annotations

from dataclasses import dataclass

from rendezvous.config import GuessLimits

# Bound on remembered keys: past it, buckets that have refilled are forgotten first.
MAX_TRACKED = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Buckets of ``burst`` tokens refilled at one per ``interval`` seconds, keyed by string."""

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self._buckets: dict[str, _Bucket] = {}

    def _refilled(self, key: str, now: float) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) / self.interval)
        bucket.updated = now
        if bucket.tokens >= self.burst:
            del self._buckets[key]  # full again: nothing to remember
            return None
        return bucket

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may fail again; 0 when it has a token now."""
        bucket = self._refilled(key, now)
        if bucket is None or bucket.tokens >= 1:
            return 0.0
        return (1 - bucket.tokens) * self.interval

    def spend(self, key: str, now: float) -> None:
        """Record one failure for ``key``."""
        bucket = self._refilled(key, now)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = max(0.0, bucket.tokens - 1)

    def _prune(self, now: float) -> None:
        for key in list(self._buckets):
            self._refilled(key, now)
        while len(self._buckets) >= MAX_TRACKED:  # all still draining: drop the oldest
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


class GuessLimiter:
    """Decides whether a CONNECT may be checked at all, and learns from each outcome."""

    def __init__(self, limits: GuessLimits | None = None) -> None:
        limits = limits or GuessLimits()
        self.limits = limits
        self.by_address = TokenBuckets(limits.per_address_burst, limits.per_address_interval)
        self.by_id = TokenBuckets(limits.per_id_burst, limits.per_id_interval)
        self._trusted: dict[tuple[str, str], float] = {}  # (address, ID) -> last success

    def retry_after(self, address: str, uuid: str, now: float) -> float:
        """0 if the CONNECT may be checked; else seconds to tell the peer to wait."""
        wait = self.by_address.retry_after(address, now)
        if not self._is_trusted(address, uuid, now):
            wait = max(wait, self.by_id.retry_after(uuid, now))
        return wait

    def failed(self, address: str, uuid: str, now: float) -> None:
        """A CONNECT from ``address`` for ``uuid`` had a wrong token or unknown ID."""
        self.by_address.spend(address, now)
        if not self._is_trusted(address, uuid, now):
            self.by_id.spend(uuid, now)

    def succeeded(self, address: str, uuid: str, now: float) -> None:
        """A CONNECT from ``address`` for ``uuid`` parked."""
        key = (address, uuid)
        if key not in self._trusted and len(self._trusted) >= MAX_TRACKED:
            self._trusted.pop(next(iter(self._trusted)))
        self._trusted[key] = now

    def _is_trusted(self, address: str, uuid: str, now: float) -> bool:
        since = self._trusted.get((address, uuid))
        return since is not None and now - since < self.limits.trust_seconds
