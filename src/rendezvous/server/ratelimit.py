"""Limits on failed guesses, so a TOTP code or a visitor password cannot be guessed at line speed.

Token buckets keyed by source address and by hidden-server ID: every failed check takes a
token; with none left, a check from that address (or for that ID) gets 429 and ``Retry-After``
without being made, so no guess is spent. Successes cost nothing. One :class:`GuessLimiter`
guards CONNECT tokens, another visitor passwords.

The real peer must not be locked out by an attacker:

- An address that succeeded for an ID recently has *good history* for it: that (address, ID)
  pair has an allowance of its own and skips both the address's bucket (which other peers
  behind the same address, a CGNAT or an office, may have drained on other IDs) and the ID's.
- The ID's bucket serves its waiting addresses in turn: once an address was refused for an
  empty ID bucket, the tokens that refill go to the addresses refused before it first. An
  attacker spending each token as it refills cannot starve a hidden server that is waiting:
  it waits at most one interval per waiting address ahead of it (``MAX_WAITERS`` at most).
"""

from __future__ import annotations

from dataclasses import dataclass

from rendezvous.config import GuessLimits

# Bound on remembered keys: past it, buckets that have refilled are forgotten first.
MAX_TRACKED = 100_000
# Addresses queued per ID for its refilling tokens; past it, newcomers are refused unqueued.
MAX_WAITERS = 32


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

    def retry_after(self, key: str, now: float, needed: float = 1.0) -> float:
        """Seconds until ``key`` has ``needed`` tokens (may fail again); 0 when it has now."""
        tokens = self.tokens(key, now)
        return 0.0 if tokens >= needed else (needed - tokens) * self.interval

    def tokens(self, key: str, now: float) -> float:
        """The tokens ``key`` has now (``burst`` for a key never spent)."""
        bucket = self._refilled(key, now)
        return float(self.burst) if bucket is None else bucket.tokens

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
    """Decides whether a guess (a CONNECT token, a visitor password) may be checked at all,
    and learns from each outcome."""

    def __init__(self, limits: GuessLimits | None = None) -> None:
        limits = limits or GuessLimits()
        self.limits = limits
        self.by_address = TokenBuckets(limits.per_address_burst, limits.per_address_interval)
        self.by_id = TokenBuckets(limits.per_id_burst, limits.per_id_interval)
        # A pair with good history has the ID's allowance for itself.
        self.by_pair = TokenBuckets(limits.per_id_burst, limits.per_id_interval)
        self._trusted: dict[tuple[str, str], float] = {}  # (address, ID) -> last success
        # ID -> addresses refused for its empty bucket, first refused first, with the time
        # each last asked (one that stops asking for an interval leaves the line).
        self._waiting: dict[str, dict[str, float]] = {}

    def set_limits(self, limits: GuessLimits) -> None:
        """New bursts and intervals (SIGHUP); the buckets keep what they hold."""
        self.limits = limits
        for buckets, burst, interval in (
            (self.by_address, limits.per_address_burst, limits.per_address_interval),
            (self.by_id, limits.per_id_burst, limits.per_id_interval),
            (self.by_pair, limits.per_id_burst, limits.per_id_interval),
        ):
            buckets.burst, buckets.interval = burst, interval

    def retry_after(self, address: str, uuid: str, now: float) -> float:
        """0 if a guess from ``address`` for ``uuid`` may be checked now (which takes the
        address out of the ID's waiting line); else seconds to tell the peer to wait."""
        if self._is_trusted(address, uuid, now):
            return self.by_pair.retry_after(f"{address} {uuid}", now)
        wait = self.by_address.retry_after(address, now)
        line = self._line(uuid, now)
        ahead = len(line) if address not in line else list(line).index(address)
        id_wait = self.by_id.retry_after(uuid, now, needed=ahead + 1)
        if id_wait > 0:
            if address in line or len(line) < MAX_WAITERS:
                if uuid not in self._waiting and len(self._waiting) >= MAX_TRACKED:
                    self._waiting.pop(next(iter(self._waiting)))
                line[address] = now
                self._waiting[uuid] = line
            return max(wait, id_wait)
        if wait == 0 and address in line:
            del line[address]
            if not line:
                self._waiting.pop(uuid, None)
        return wait

    def _line(self, uuid: str, now: float) -> dict[str, float]:
        line = self._waiting.get(uuid)
        if line is None:
            return {}
        patience = self.limits.per_id_interval + self.by_id.retry_after(uuid, now)
        for address, asked in list(line.items()):
            if now - asked > patience:  # gave up (or was never a real peer)
                del line[address]
        if not line:
            del self._waiting[uuid]
        return line

    def failed(self, address: str, uuid: str, now: float) -> None:
        """A guess from ``address`` for ``uuid`` was wrong (wrong token, unknown ID, wrong
        visitor password)."""
        if self._is_trusted(address, uuid, now):
            self.by_pair.spend(f"{address} {uuid}", now)
            return
        self.by_address.spend(address, now)
        self.by_id.spend(uuid, now)

    def succeeded(self, address: str, uuid: str, now: float) -> None:
        """A guess from ``address`` for ``uuid`` was right (it parked, or passed)."""
        key = (address, uuid)
        if key not in self._trusted and len(self._trusted) >= MAX_TRACKED:
            self._trusted.pop(next(iter(self._trusted)))
        self._trusted[key] = now

    def _is_trusted(self, address: str, uuid: str, now: float) -> bool:
        since = self._trusted.get((address, uuid))
        return since is not None and now - since < self.limits.trust_seconds
