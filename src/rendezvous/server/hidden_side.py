"""The hidden side of a leg: a CONNECT's token check against the registry, then parking.

A code is claimed by the address that first used it (hub, and cluster-wide with --cluster), so
a leaked code cannot take over an ID's pool from elsewhere.
"""

from __future__ import annotations

from rendezvous import logs
from rendezvous.errors import RegistryError
from rendezvous.protocol import responses
from rendezvous.protocol.routing import DIAG_INVALID, Park
from rendezvous.protocol.totp import token_is_valid
from rendezvous.registry import Entry
from rendezvous.server.hub import CODE_CLAIM_STEPS, CODE_TAKEN
from rendezvous.server.leg import PARKED, PUBLIC, VERIFYING, LegBase, set_keepalive


class HiddenSide(LegBase):
    """A leg that sent CONNECT: its token check, parking, keepalive and eviction."""

    __slots__ = ()

    def _verify_soon(self, park: Park) -> None:
        """Check the CONNECT token: at once when its entry is kept in memory and the token
        checks out against it (no task, no registry read: the common case of a known hidden
        server re-parking), else in a task that reads the registry (:meth:`_verify`)."""
        hub = self.hub
        if hub.cluster is None:  # (a cluster claims each code on every node: an await)
            entry = self._kept_entry(park.uuid)
            if entry is not None and token_is_valid(entry.base32, entry.step, park.token):
                self._admit(park, entry)
                return
        hub.spawn(self._verify(park))

    async def _verify(self, park: Park) -> None:
        """Check the CONNECT token, then park or refuse."""
        hub = self.hub
        try:
            seen = hub.registry_changes
            entry = await self._lookup(park.uuid)
            if hub.registry_changes != seen or (  # a change came meanwhile: this may predate it
                    # (or a secret rotated on another node, its news still on the way)
                    entry is not None and not token_is_valid(entry.base32, entry.step,
                                                             park.token)):
                entry = await self._lookup(park.uuid, cached=False)
        except Exception as exc:  # any backend failure must cost this peer only
            if not isinstance(exc, RegistryError):
                logs.log.exception("registry lookup failed")
            if self.state == VERIFYING:
                self._reject(f"registry error: {exc}",
                             responses.bare_error(503, "registry unavailable"), status=503)
            return
        if self.state != VERIFYING:
            return  # the peer left, or broke the protocol, while we looked it up
        if entry is None or not token_is_valid(entry.base32, entry.step, park.token):
            reason = "unknown ID" if entry is None else "wrong token"
            hub.guesses.failed(self.address, park.uuid, hub.loop.time())
            self._reject(reason, responses.bare_error(401, DIAG_INVALID), status=401)
            return
        # With a cluster, the first address to use a code holds it on every node.
        cluster, claim = hub.cluster, CODE_CLAIM_STEPS * entry.step
        taken = cluster is not None and not await cluster.claim_code(
            park.uuid, park.token, self.address, claim)
        if self.state != VERIFYING:
            return
        self._admit(park, entry, taken)

    def _admit(self, park: Park, entry: Entry, taken: bool = False) -> None:
        """Park a connection whose token checked out against ``entry``, unless its code is
        ``taken`` by another address (cluster-wide) or here, or its pool is full."""
        hub = self.hub
        refusal = CODE_TAKEN if taken else hub.refusal(self, park.token, entry.step)
        if refusal == CODE_TAKEN:  # a leaked code, replayed from elsewhere: as a wrong one
            hub.guesses.failed(self.address, park.uuid, hub.loop.time())
            self._reject(refusal, responses.bare_error(401, DIAG_INVALID), status=401)
            return
        if refusal is not None:  # the pool is full, and none of it is this address's to evict
            self._reject(refusal, responses.bare_error(503, refusal), status=503)
            return
        hub.guesses.succeeded(self.address, park.uuid, hub.loop.time())
        self.send_proxy = park.proxy
        self.entry = entry
        self._cancel_timer()
        self.transport.write(responses.PARKED)
        self.state = PARKED
        self.since = hub.loop.time()
        self._enable_keepalive()
        waiting = hub.park(self)
        logs.event("parked", id=self.uuid, peer=self._peer_text(),
                   pool=hub.parked_count(self.uuid))
        if waiting is not None:
            waiting.pair_with(self)

    def _enable_keepalive(self) -> None:
        if self.kind == PUBLIC:
            return  # inherited from the public listener (leg.tune_listener)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            set_keepalive(sock)

    def evict(self, reason: str) -> None:
        """Close a parked connection the pool no longer keeps."""
        if self.state == PARKED:
            logs.event("evicted", id=self.uuid, peer=self._peer_text(), reason=reason)
            self.hub.unpark(self)
            self._close()


