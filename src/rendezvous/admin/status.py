"""Live numbers of the relay in this process, read from its hub when a page asks for them.

Nothing here runs unless a browser polls: no timer, and no work in the relay's byte path. Totals
of bytes are kept by the hub when a pairing closes; the bytes of pairings still open come from
``Hub.bytes_in_flight`` (never from connections directly), so a long transfer shows while it
runs.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rendezvous.server.hub import Hub

# Rates are averaged over this many seconds of samples (the page polls every 2 s).
RATE_WINDOW = 10.0
# Recent rejections shown on the page, newest first.
SHOWN_REJECTIONS = 10
# Samples kept at most, however many browsers poll at once.
MAX_SAMPLES = 64


@dataclass(frozen=True, slots=True)
class IdNumbers:
    """One hidden server's live numbers."""

    parked: int = 0
    active: int = 0
    pairings: int = 0
    bytes: int = 0  # both ways, closed pairings and open ones
    last_seen: float = 0.0  # wall-clock time of its last park or pairing; 0: never

    def as_json(self) -> dict[str, Any]:
        return {"parked": self.parked, "active": self.active, "pairings": self.pairings,
                "bytes": self.bytes, "last_seen": self.last_seen}


class StatusSampler:
    """Reads the hub; remembers a few samples to turn totals into per-second rates."""

    def __init__(self, hub: Hub[Any]) -> None:
        self.hub = hub
        # (loop time, pairings, bytes), oldest first
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=MAX_SAMPLES)

    def ids(self, in_flight: dict[str, int] | None = None) -> dict[str, IdNumbers]:
        """Numbers for every ID the relay has seen since it started."""
        hub = self.hub
        if in_flight is None:
            in_flight = hub.bytes_in_flight()
        found: dict[str, IdNumbers] = {}
        for uuid in hub.stats.per_id.keys() | hub.parked_ids():
            stats = hub.stats.per_id.get(uuid)
            if stats is None:
                found[uuid] = IdNumbers(parked=hub.parked_count(uuid))
                continue
            found[uuid] = IdNumbers(
                parked=hub.parked_count(uuid),
                active=stats.active,
                pairings=stats.pairings,
                bytes=stats.bytes_up + stats.bytes_down + in_flight.get(uuid, 0),
                last_seen=stats.last_seen,
            )
        return found

    def snapshot(self) -> dict[str, Any]:
        """The relay's numbers now, as the status JSON's ``relay`` and ``ids``."""
        hub = self.hub
        stats = hub.stats
        in_flight = hub.bytes_in_flight()
        total_bytes = stats.bytes_up + stats.bytes_down + sum(in_flight.values())
        now = hub.loop.time()
        samples = self._samples
        samples.append((now, stats.pairings, total_bytes))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW:
            samples.popleft()
        then, pairings_then, bytes_then = samples[0]
        elapsed = now - then
        pairing_rate = (stats.pairings - pairings_then) / elapsed if elapsed > 0 else 0.0
        # A pairing's bytes move from "in flight" to the totals when it closes; one that
        # closed half-way through a sample may dip for a moment: never show a negative rate.
        byte_rate = max(0.0, (total_bytes - bytes_then) / elapsed) if elapsed > 0 else 0.0
        rejections = [
            {"time": r.time, "reason": r.reason, "status": r.status, "id": r.uuid, "peer": r.peer}
            for r in list(stats.recent_rejections)[-SHOWN_REJECTIONS:][::-1]
        ]
        return {
            "now": time.time(),
            "relay": {
                "parked": hub.parked_count(),
                "active": hub.active_pairs,
                "open": hub.open_connections,
                "pairings": stats.pairings,
                "pairings_per_second": round(pairing_rate, 3),
                "bytes": total_bytes,
                "bytes_per_second": round(byte_rate, 1),
                "rejections_total": sum(stats.rejections.values()),
                "rejections": rejections,
            },
            "ids": {uuid: n.as_json() for uuid, n in self.ids(in_flight).items()},
        }
