"""Registry changes reach the parked connections, whoever made them.

A rotation or removal (by the CLI in another process, the admin page, another relay node) must
cut the connections parked under the old secret at once, and a new visitor password must apply
to the very next visitor. The registry's ``watch()`` reports which IDs changed; for each one with
connections parked here, the entry is read again and applied by :func:`revoke`: the parked
connections it no longer admits are closed, the rest take it on for their visitor checks.
Pairings already relaying are left to finish (a rotation must not cut a download in flight; the
hidden server's next park needs the new secret anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from rendezvous import logs
from rendezvous.errors import RegistryError
from rendezvous.registry import Entry
from rendezvous.registry.base import Changes
from rendezvous.server.hub import Hub
from rendezvous.server.leg import LegBase

# After the watch fails (Redis unreachable), wait this long before watching again. Parked
# connections stay meanwhile: an unreachable registry must not take every hidden server down.
RETRY_DELAY = 1.0
# Entries read at once when re-checking: a relay holding thousands of IDs re-checks them all
# after a Redis reconnect (and every 30 s), in round trips of this many, not one by one.
READ_BATCH = 64


class RevocationWatch:
    """Follows the registry of ``hub`` and applies each change to its parked connections."""

    def __init__(self, hub: Hub[LegBase], interval: float) -> None:
        self.hub = hub
        self.interval = interval  # seconds between polls, for backends that poll
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start following, on the hub's loop."""
        self._task = self.hub.loop.create_task(self._run())

    async def close(self) -> None:
        """Stop following."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failing = False
        while True:
            entries = self.hub.entries
            try:
                async for changes in self.hub.registry.watch(self.interval):
                    await self.apply(changes)
                    if not entries.following:  # (the first report: everything) from now on
                        entries.follow(True)  # the cache is kept current
                    if failing:
                        failing = False
                        logs.event("registry watch resumed")
            except RegistryError as exc:
                if not failing:  # once per outage, not once per retry
                    logs.event("registry watch failed, parked connections kept",
                               level=logging.WARNING, error=str(exc))
                failing = True
            except Exception:  # a bug here must not end revocation for good
                logs.log.exception("registry watch failed")
                failing = True
            finally:
                entries.follow(False)  # changes may be missed until the watch runs again
            await asyncio.sleep(RETRY_DELAY)

    async def apply(self, changes: Changes) -> None:
        """Read again each changed ID with connections parked here, and revoke."""
        hub = self.hub
        hub.registry_changes += 1  # before reading: token checks under way will look again
        hub.entries.changed(changes)
        parked = hub.parked_ids()
        ids = list(parked) if changes.everything else [u for u in changes.ids if u in parked]
        for start in range(0, len(ids), READ_BATCH):
            batch = ids[start:start + READ_BATCH]
            entries = await asyncio.gather(*(hub.registry.get(uuid) for uuid in batch))
            for uuid, entry in zip(batch, entries, strict=True):
                revoke(hub, uuid, entry)


def revoke(hub: Hub[LegBase], uuid: str, entry: Entry | None) -> int:
    """Apply the registry's current ``entry`` for ``uuid`` (None: removed) to its connections
    parked in ``hub``: those parked with another secret are closed; the others take the entry
    on, so their next pairing checks visitors against it. Returns how many were closed."""
    closed = 0
    for hidden in hub.parked(uuid):
        if entry is None or hidden.entry is None or not entry.same_secret(hidden.entry):
            hidden.evict("revoked")
            closed += 1
        else:
            hidden.entry = entry
    if closed:
        logs.event("revoked", id=uuid, closed=closed,
                   reason="removed" if entry is None else "new secret")
    return closed
