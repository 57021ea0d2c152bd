"""The asyncio stream plumbing both agents share: copy bytes, read a short answer, close.

The hidden agent (its :func:`~rendezvous.agent.hidden.forward_to` handler, through
:func:`splice`) and the mobile tunnel move bytes with :func:`pump`, read the relay's answers
with :func:`read_head` and :func:`read_at_most`, and close every connection with
:func:`close_writer`, which never waits longer than ``CLOSE_TIMEOUT``. What the bytes mean is
:mod:`rendezvous.protocol`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from rendezvous.protocol.head import HEAD_END

# Bytes per read: 256 KiB reads nearly double a streams relay over 64 KiB ones (docs/protocol.md,
# "Measured facts"). It is also each StreamReader's limit, so at most twice that is buffered
# before reading pauses.
READ_CHUNK = 256 * 1024
# Bound on waiting for a writer to finish closing (a flush, the close_notify exchange); past
# it the connection is cut, so a peer that never answers our close_notify holds nothing.
CLOSE_TIMEOUT = 5.0
# Keepalive on connections parked at the relay: a dead NAT mapping is noticed within a minute.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3


async def pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    on_chunk: Callable[[int], object] | None = None,
) -> bool:
    """Copy ``source`` to ``sink`` until EOF (True) or an error on either side (False).

    Back-pressure: each chunk is drained before the next is read, so never more than the
    sink's buffer is held. ``on_chunk`` is told the size of each chunk before it is written.
    """
    try:
        while chunk := await source.read(READ_CHUNK):
            if on_chunk is not None:
                on_chunk(len(chunk))
            sink.write(chunk)
            await sink.drain()
    except OSError:  # ConnectionError included
        return False
    return True


async def splice(
    relay_reader: asyncio.StreamReader, relay_writer: asyncio.StreamWriter,
    local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter,
) -> None:
    """Copy a pairing (relay side) and a local service's connection both ways until the local
    side is done (or either side fails). When the mobile side ends its stream the local
    connection is half-closed and its answer still flows back; the caller closes both."""
    up = asyncio.create_task(pump(relay_reader, local_writer))
    down = asyncio.create_task(pump(local_reader, relay_writer))
    try:
        await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        if not down.done() and up.result():
            # The mobile side ended its stream: pass the EOF on, let the answer finish.
            with contextlib.suppress(OSError, RuntimeError):
                if local_writer.can_write_eof():
                    local_writer.write_eof()
            await down
        # Otherwise the local service ended its stream, or a side failed: the caller closes.
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


async def close_writer(writer: asyncio.StreamWriter, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close after flushing; cut the connection if that takes longer than ``timeout``."""
    writer.close()
    try:
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the peer reset the connection, or its TLS close failed: closed all the same


async def read_head(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, int, bool]:
    """Read until a blank line ends a head: (everything read, index past the head or -1 when
    EOF or ``limit`` came first, whether EOF came)."""
    data = bytearray()
    while True:
        end = data.find(HEAD_END)
        if end >= 0:
            return bytes(data), end + len(HEAD_END), False
        if len(data) > limit:
            return bytes(data), -1, False
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            return bytes(data), -1, True
        data += chunk


async def read_at_most(
    reader: asyncio.StreamReader, limit: int, timeout: float | None = None
) -> bytes:
    """Up to ``limit`` bytes: until EOF, or what came before ``timeout`` seconds passed or the
    connection failed (a short error body is worth having even when its close is not clean)."""
    data = bytearray()
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(timeout):
            while len(data) < limit:
                chunk = await reader.read(limit - len(data))
                if not chunk:
                    break
                data += chunk
    return bytes(data)


def enable_keepalive(
    transport: asyncio.BaseTransport,
    idle: int = KEEPALIVE_IDLE,
    interval: int = KEEPALIVE_INTERVAL,
    count: int = KEEPALIVE_COUNT,
) -> None:
    """TCP keepalive on ``transport``'s socket: probes after ``idle`` seconds of silence,
    every ``interval`` seconds, ``count`` of them before the connection is declared dead."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
