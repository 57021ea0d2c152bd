"""The hub's pool logic, I/O-free: fake legs on a loop that is never run (its clock is read)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from rendezvous.config import Limits
from rendezvous.registry import open_registry
from rendezvous.server.hub import CODE_TAKEN, POOL_TAKEN, Hub

STEP = 30


@dataclass(eq=False)
class FakeLeg:
    """What the hub asks of a leg, and a record of what it did to it."""

    hub: Hub[FakeLeg]
    uuid: str
    address: str = "127.0.0.2"
    since: float = 0.0
    received: int = 0
    evicted: list[str] = field(default_factory=list)
    aborted: bool = False

    def evict(self, reason: str) -> None:
        self.evicted.append(reason)
        self.hub.unpark(self)

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def make_hub(loop: asyncio.AbstractEventLoop, **limits: object) -> Hub[FakeLeg]:
    return Hub(open_registry("memory://"), Limits(**limits), loop)  # type: ignore[arg-type]


def park(hub: Hub[FakeLeg], uuid: str = "A", address: str = "127.0.0.2", since: float = 0.0,
         code: str = "123456") -> FakeLeg:
    leg = FakeLeg(hub, uuid, address, since)
    assert hub.refusal(leg, code, STEP) is None
    assert hub.park(leg) is None
    return leg


def test_pairs_the_newest_and_evicts_the_oldest(loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop, pool_size=3)
    legs = [park(hub, since=t) for t in range(4)]  # the 4th evicts the 1st
    assert legs[0].evicted == ["pool full"]
    assert hub.parked("A") == legs[1:]
    assert hub.take("A") is legs[3]
    assert hub.take("A") is legs[2]
    assert hub.take("A") is legs[1]
    assert hub.take("A") is None
    assert hub.parked_count() == 0 and "A" not in hub.parked_ids()


def test_abandoned_first_connection_is_not_the_one_paired(
        loop: asyncio.AbstractEventLoop) -> None:
    # Measured with FIFO: a second park while the first sat abandoned, and the next visitor
    # got the abandoned one.
    hub = make_hub(loop)
    abandoned = park(hub, since=0.0)
    fresh = park(hub, since=5.0)
    assert hub.take("A") is fresh
    assert hub.parked("A") == [abandoned]


def test_full_pool_evicts_only_the_same_address(loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop, pool_size=3)
    first_b = park(hub, address="127.0.0.3", since=0.0, code="111111")
    a_legs = [park(hub, address="127.0.0.2", since=t) for t in (1.0, 2.0)]
    newcomer = park(hub, address="127.0.0.2", since=3.0)  # evicts A's oldest, not B's older one
    assert a_legs[0].evicted == ["pool full"] and not first_b.evicted
    assert hub.parked("A") == [first_b, a_legs[1], newcomer]


def test_full_pool_of_other_addresses_refuses(loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop, pool_size=2)
    owners = [park(hub, address="127.0.0.2", since=t) for t in (0.0, 1.0)]
    stranger = FakeLeg(hub, "A", "127.0.0.3", 2.0)
    assert hub.refusal(stranger, "654321", STEP) == POOL_TAKEN
    with pytest.raises(RuntimeError):
        hub.park(stranger)  # a caller that skipped refusal() cannot break the rule either
    assert hub.parked("A") == owners and not any(leg.evicted for leg in owners)
    # Another ID's pool is not this one's: B parks freely from the stranger's address.
    assert hub.refusal(FakeLeg(hub, "B", "127.0.0.3"), "654321", STEP) is None


def test_a_code_parks_again_only_from_its_first_address(
        loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop)
    park(hub, address="127.0.0.2", code="123456")
    park(hub, address="127.0.0.2", code="123456")  # a pool parks several with one code
    assert hub.refusal(FakeLeg(hub, "A", "127.0.0.3"), "123456", STEP) == CODE_TAKEN
    # The claim is per ID and code: the next code, or the same code for another ID, is free.
    assert hub.refusal(FakeLeg(hub, "A", "127.0.0.3"), "999999", STEP) is None
    assert hub.refusal(FakeLeg(hub, "B", "127.0.0.3"), "123456", STEP) is None


def test_a_code_claim_ends_after_its_window(loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop)
    park(hub, address="127.0.0.2", code="123456")
    key = ("A", "123456")
    address, until = hub._codes[key]
    assert address == "127.0.0.2" and until == pytest.approx(loop.time() + 3 * STEP, abs=1)
    hub._codes[key] = (address, loop.time() - 1)  # as if three steps had passed
    assert hub.refusal(FakeLeg(hub, "A", "127.0.0.3"), "123456", STEP) is None
    assert hub._codes[key][0] == "127.0.0.3"


def test_a_parked_connection_goes_to_the_first_waiting_client(
        loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop)
    first, second = FakeLeg(hub, "A"), FakeLeg(hub, "A")
    hub.wait_for(first)
    hub.wait_for(second)
    assert hub.waiting_count("A") == 2
    hidden = FakeLeg(hub, "A")
    assert hub.refusal(hidden, "123456", STEP) is None
    assert hub.park(hidden) is first
    hub.stop_waiting(second)
    assert hub.waiting_count() == 0 and hub.parked_count("A") == 0
    assert hub.stats.parked == 1


def test_returned_connection_keeps_its_place_in_parking_order(
        loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop)
    old, middle = park(hub, since=1.0), park(hub, since=2.0)
    taken = park(hub, since=3.0)
    assert hub.take("A") is taken
    later = park(hub, since=4.0)  # parked while the taken one settled
    assert hub.return_to_pool(taken) is None
    assert hub.parked("A") == [old, middle, taken, later]
    waiting = FakeLeg(hub, "A")
    assert hub.take("A") is later
    hub.wait_for(waiting)
    assert hub.return_to_pool(later) is waiting  # a client waits: it goes to that one


def test_sweeper_closes_old_connections_whatever_was_paired(
        loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop, parked_timeout=100.0)
    now = loop.time()
    stale, fresh = park(hub, since=now - 150), park(hub, since=now - 10)
    other = park(hub, uuid="B", since=now - 101)
    hub.start_sweeping()
    hub.stop_sweeping()
    assert stale.evicted == ["parked too long"] and other.evicted == ["parked too long"]
    assert not fresh.evicted and hub.parked("A") == [fresh]
    assert hub.parked_count() == 1


def test_unpark_and_pool_change_callback(loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop)
    changes: list[str] = []
    hub.on_pool_change = changes.append
    leg = park(hub)
    assert hub.unpark(leg) and not hub.unpark(leg)
    assert hub.take("A") is None
    assert changes == ["A", "A"]
    assert hub.pool_sizes() == {}


def test_counters_of_connections_and_pairs(loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop)
    mobile, hidden, outbound = FakeLeg(hub, "A"), FakeLeg(hub, "A"), FakeLeg(hub, "")
    hub.opened(mobile, "127.0.0.5")
    hub.opened(hidden, "127.0.0.5")
    hub.opened(outbound, None)  # ours: counted open, not against an address
    assert hub.open_connections == 3 and hub.from_address("127.0.0.5") == 2
    hub.paired("A", 0.004)
    hub.relay_started(mobile, hidden)
    mobile.received, hidden.received = 10, 25
    assert hub.active_pairs == 1 and hub.bytes_in_flight() == {"A": 35}
    assert hub.stats.for_id("A").active == 1
    hub.relay_ended(mobile)
    stats = hub.stats
    assert hub.active_pairs == 0 and hub.bytes_in_flight() == {}
    assert (stats.pairings, stats.bytes_up, stats.bytes_down) == (1, 10, 25)
    per_id = stats.for_id("A")
    assert (per_id.active, per_id.pairings, per_id.bytes_up, per_id.bytes_down) == (0, 1, 10, 25)
    assert stats.pairing_latency.count == 1
    hub.rejected("registry error: down", 503, "A", "127.0.0.5:1")
    assert stats.rejections == {"registry error": 1}
    assert stats.recent_rejections[-1].status == 503
    hub.abort_all()
    assert mobile.aborted and hidden.aborted and outbound.aborted
    for leg, address in ((mobile, "127.0.0.5"), (hidden, "127.0.0.5"), (outbound, None)):
        hub.closed(leg, address)
    assert hub.open_connections == 0 and hub.from_address("127.0.0.5") == 0


def test_close_parked_of_one_id_or_all(loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop)
    a, b = park(hub, "A"), park(hub, "B")
    assert hub.close_parked("A", reason="revoked") == 1
    assert a.evicted == ["revoked"] and hub.parked_ids() == {"B"}
    assert hub.close_parked() == 1 and b.evicted == ["shutting down"]
    assert hub.parked_count() == 0


def test_sweeper_drops_expired_code_claims(loop: asyncio.AbstractEventLoop) -> None:
    hub = make_hub(loop)
    park(hub, uuid="A", code="111111")
    park(hub, uuid="B", code="222222")
    hub._codes[("A", "111111")] = ("127.0.0.2", loop.time() - 1)  # its window is over
    hub.start_sweeping()
    hub.stop_sweeping()
    assert set(hub._codes) == {("B", "222222")}
