"""Internal links (server/links.py): many streams on one mutual-TLS connection, in one process.

Real TLS on 127.0.0.1 with the cluster's own contexts; the peers are Links on both ends, or, to
play a broken or hostile node, raw frames written on a TLS connection by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from rendezvous.protocol import mux
from rendezvous.server.cluster import CLUSTER_CERT_NAME, cluster_ssl_contexts
from rendezvous.server.links import Link, LinkDialer, LinkStream

SERVER_CONTEXT, CLIENT_CONTEXT = cluster_ssl_contexts("links-test-key-0123456789")
WINDOW = 64 * 1024


class Recorder(asyncio.Protocol):
    """A stream's protocol that keeps what happens to it."""

    def __init__(self, *, keep_open_on_eof: bool = True, paused: bool = False) -> None:
        self.transport: LinkStream | None = None
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_with: Exception | None = None
        self.pauses = 0
        self.resumes = 0
        self.keep_open_on_eof = keep_open_on_eof
        self.paused = paused
        self.grew = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, LinkStream)
        self.transport = transport
        if self.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.grew.set()

    def eof_received(self) -> bool:
        self.eof.set()
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_with = exc
        self.lost.set()

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1

    async def wait_for(self, size: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.data) < size:
                self.grew.clear()
                await self.grew.wait()


@dataclass
class Acceptor:
    """A listener whose every connection is a Link; each stream opened on it gets a protocol
    from ``make`` (a Recorder unless told otherwise)."""

    make: Callable[[LinkStream], asyncio.Protocol] = field(
        default=lambda stream: Recorder())
    timeout: float = 10.0
    links: list[Link] = field(default_factory=list)
    streams: list[LinkStream] = field(default_factory=list)
    address: str = ""

    def link(self) -> Link:
        link = Link(loop=asyncio.get_running_loop(), window=WINDOW, timeout=self.timeout,
                    on_stream=self._stream)
        self.links.append(link)
        return link

    def _stream(self, stream: LinkStream) -> None:
        protocol = self.make(stream)
        stream.set_protocol(protocol)
        self.streams.append(stream)
        protocol.connection_made(stream)

    def protocol(self, index: int) -> Recorder:
        found = self.streams[index].get_protocol()
        assert isinstance(found, Recorder)
        return found


@asynccontextmanager
async def listening(acceptor: Acceptor) -> AsyncIterator[Acceptor]:
    server = await asyncio.get_running_loop().create_server(
        acceptor.link, "127.0.0.1", 0, ssl=SERVER_CONTEXT)
    acceptor.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield acceptor
    finally:
        for link in acceptor.links:
            if link.transport is not None:
                link.transport.abort()
        server.close()
        await asyncio.sleep(0.05)  # (the aborts' callbacks run)


def dialer(timeout: float = 10.0) -> LinkDialer:
    loop = asyncio.get_running_loop()

    async def connect(address: str, factory: Callable[[], Link]) -> tuple[Any, Link]:
        host, _, port = address.rpartition(":")
        return await loop.create_connection(factory, host, int(port), ssl=CLIENT_CONTEXT,
                                            server_hostname=CLUSTER_CERT_NAME)

    return LinkDialer(connect, loop=loop, window=WINDOW, timeout=timeout)


async def raw_link(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to a Link that frames are written on by hand."""
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port), ssl=CLIENT_CONTEXT,
                                         server_hostname=CLUSTER_CERT_NAME)


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def run(coroutine: Any) -> None:
    asyncio.run(coroutine)


def test_many_streams_cross_one_link_both_ways_in_order_with_half_closes() -> None:
    async def main() -> None:
        async with listening(Acceptor()) as acceptor:
            links = dialer()
            ours = [await links.open_stream(acceptor.address, Recorder) for _ in range(40)]
            bodies = [os.urandom(50_000 + 7_919 * n) for n in range(40)]
            for protocol, body in zip(ours, bodies, strict=True):
                assert protocol.transport is not None
                for start in range(0, len(body), 30_000):  # (writes of any size)
                    protocol.transport.write(body[start:start + 30_000])
                protocol.transport.write_eof()
            await until(lambda: len(acceptor.streams) == 40, "40 streams opened")
            assert links.opened == 1 and len(acceptor.links) == 1
            for n, body in enumerate(bodies):
                theirs = acceptor.protocol(n)
                await theirs.wait_for(len(body))
                await asyncio.wait_for(theirs.eof.wait(), 5)
                assert hashlib.sha256(theirs.data).digest() == hashlib.sha256(body).digest()
                # Half-closed one way only: the answer still flows back, then a close.
                assert theirs.transport is not None
                theirs.transport.write(body[::-1])
                theirs.transport.close()
            for protocol, body in zip(ours, bodies, strict=True):
                await protocol.wait_for(len(body))
                await asyncio.wait_for(protocol.lost.wait(), 5)
                assert bytes(protocol.data) == body[::-1]
                assert protocol.lost_with is None
            await until(lambda: not acceptor.links[0].streams, "streams forgotten")
            assert links.link_count() == 1  # the link stays for the next clients

    run(main())


def test_a_reader_that_stops_makes_the_other_node_hold_at_most_a_window() -> None:
    async def main() -> None:
        async with listening(Acceptor(make=lambda stream: Recorder(paused=True))) as acceptor:
            links = dialer()
            ours = await links.open_stream(acceptor.address, Recorder)
            assert ours.transport is not None
            body = os.urandom(4 * 1024 * 1024)
            for start in range(0, len(body), 65536):
                ours.transport.write(body[start:start + 65536])
            await until(lambda: acceptor.streams and acceptor.streams[0]._inbox, "arrived")
            await asyncio.sleep(0.3)
            theirs_stream = acceptor.streams[0]
            held = sum(len(chunk) for chunk in theirs_stream._inbox)
            assert held <= WINDOW  # what the paused reader's node holds for it
            assert acceptor.protocol(0).data == b""
            # The writer was told to stop, and keeps the rest itself.
            assert ours.pauses == 1 and ours.resumes == 0
            assert ours.transport.get_write_buffer_size() >= len(body) - WINDOW
            theirs_stream.resume_reading()
            theirs = acceptor.protocol(0)
            await theirs.wait_for(len(body))
            assert hashlib.sha256(theirs.data).digest() == hashlib.sha256(body).digest()
            await until(lambda: ours.resumes == 1, "writer resumed")
            assert ours.transport.get_write_buffer_size() == 0

    run(main())


@pytest.mark.parametrize(("frames", "reason"), [
    (mux.frame(mux.OPEN, 1) + mux.HEADER.pack(mux.DATA, 1, WINDOW + 1) + b"x" * (WINDOW + 1),
     "stream 1 sent past its credit"),
    (mux.frame(99, 1), "unknown frame kind 99"),
    (mux.frame(mux.OPEN, 1) + mux.frame(mux.OPEN, 1), "unexpected OPEN of stream 1"),
])
def test_a_node_that_breaks_the_rules_loses_only_its_own_link(
        frames: bytes, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with listening(Acceptor()) as acceptor:
            good = await dialer().open_stream(acceptor.address, Recorder)
            reader, writer = await raw_link(acceptor.address)
            writer.write(frames)
            await writer.drain()
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # cut
            writer.close()
            broken = [record.__dict__["event_fields"] for record in caplog.records
                      if record.getMessage() == "internal link broken"]
            assert [fields["reason"] for fields in broken] == [reason]
            # The well-behaved node's stream on its own link is untouched.
            assert good.transport is not None
            good.transport.write(b"still here")
            good_link = acceptor.links[0]  # (the first to connect)
            theirs = next(stream for stream in acceptor.streams if stream.link is good_link)
            protocol = theirs.get_protocol()
            assert isinstance(protocol, Recorder)
            await protocol.wait_for(10)
            assert protocol.data == b"still here" and not good.lost.is_set()

    run(main())


def test_a_silent_link_is_closed_and_a_quiet_healthy_one_is_kept() -> None:
    async def main() -> None:
        async with listening(Acceptor(timeout=0.4)) as acceptor:
            healthy = dialer(timeout=0.4)
            kept = await healthy.open_stream(acceptor.address, Recorder)
            _, writer = await raw_link(acceptor.address)
            writer.write(mux.frame(mux.OPEN, 1))  # ... then nothing, not even a PING
            await until(lambda: len(acceptor.streams) == 2, "both streams opened")
            silent = acceptor.protocol(1)
            await asyncio.wait_for(silent.lost.wait(), 3)
            assert isinstance(silent.lost_with, ConnectionResetError)
            await asyncio.sleep(1.2)  # three timeouts: the healthy link's PINGs kept it
            assert not kept.lost.is_set() and healthy.link_count() == 1
            writer.close()

    run(main())


def test_a_probe_is_answered_before_any_byte_reaches_anyone() -> None:
    def make(stream: LinkStream) -> asyncio.Protocol:
        protocol = Recorder()
        if stream.id == 1:
            stream.get_extra_info("link").loop.call_soon(stream.abort)  # refused
        elif stream.id == 2:
            stream.get_extra_info("link").loop.call_soon(stream.accept)
        else:  # an answer written before any accept takes the client too
            stream.get_extra_info("link").loop.call_soon(stream.write, b"hello")
        return protocol

    async def main() -> None:
        async with listening(Acceptor(make=make)) as acceptor:
            links = dialer()
            answers = []
            for _ in range(3):
                protocol = await links.open_stream(acceptor.address, Recorder, probe=True)
                assert protocol.transport is not None and protocol.transport.answer is not None
                answers.append(await asyncio.wait_for(protocol.transport.answer, 5))
            assert answers == [False, True, True]
            assert acceptor.streams[0].get_extra_info("probe")
            assert protocol.data == b"" or protocol.data == b"hello"
            await protocol.wait_for(5)
            assert protocol.data == b"hello"

    run(main())


def test_after_goaway_new_streams_take_a_new_link_and_old_ones_finish() -> None:
    async def main() -> None:
        async with listening(Acceptor()) as acceptor:
            links = dialer()
            before = await links.open_stream(acceptor.address, Recorder)
            await until(lambda: len(acceptor.streams) == 1, "first stream")
            acceptor.links[0].goaway()  # that node is leaving
            await until(lambda: links.link_count() == 0, "the dialer saw GOAWAY")
            after = await links.open_stream(acceptor.address, Recorder)
            assert links.opened == 2
            assert after.transport is not None and before.transport is not None
            before.transport.write(b"old")
            after.transport.write(b"new")
            await until(lambda: len(acceptor.streams) == 2, "second stream")
            await acceptor.protocol(0).wait_for(3)
            await acceptor.protocol(1).wait_for(3)
            assert (acceptor.protocol(0).data, acceptor.protocol(1).data) == (b"old", b"new")
            before.transport.close()  # the draining link's last stream: the link closes
            await until(lambda: acceptor.links[0].closed, "the old link closed")
            assert not after.lost.is_set()

    run(main())


def test_a_probe_whose_link_dies_unanswered_is_not_taken_for_a_refusal() -> None:
    # The other node may have passed the request on already: None (unknown), never False,
    # so the forwarding node does not send the same request somewhere else.
    def make(stream: LinkStream) -> asyncio.Protocol:
        link = stream.get_extra_info("link")
        link.loop.call_soon(link.transport.abort)  # that node dies before answering
        return Recorder()

    async def main() -> None:
        async with listening(Acceptor(make=make)) as acceptor:
            protocol = await dialer().open_stream(acceptor.address, Recorder, probe=True)
            assert protocol.transport is not None and protocol.transport.answer is not None
            assert await asyncio.wait_for(protocol.transport.answer, 5) is None
            await asyncio.wait_for(protocol.lost.wait(), 5)

    run(main())
