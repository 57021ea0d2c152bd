"""agent/streams.py over real loopback sockets: the pump copies with back-pressure and says how
it ended; a close that cannot flush is cut after its timeout instead of hanging."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from rendezvous.agent.streams import close_writer, pump, read_at_most, read_head

pytestmark = pytest.mark.timeout(30)


async def _pair() -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                           asyncio.StreamReader, asyncio.StreamWriter, asyncio.Server]:
    """A connected pair of loopback streams: (client reader, writer, server reader, writer)."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future())

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client_reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
    server_reader, server_writer = await accepted
    return client_reader, client_writer, server_reader, server_writer, server


def test_pump_copies_everything_counts_it_and_reports_eof() -> None:
    async def main() -> None:
        _a_reader, a_writer, b_reader, b_writer, server = await _pair()
        _c_reader, c_writer, d_reader, d_writer, server2 = await _pair()
        data = bytes(range(256)) * 8192  # 2 MiB, more than one read
        sizes: list[int] = []
        copying = asyncio.create_task(pump(b_reader, c_writer, sizes.append))
        reading = asyncio.create_task(d_reader.read())  # everything, up to the EOF
        a_writer.write(data)
        a_writer.write_eof()
        assert await copying is True  # ended by the EOF, not by an error
        c_writer.write_eof()
        received = await reading
        assert received == data and sum(sizes) == len(data) and len(sizes) > 1
        for writer in (a_writer, b_writer, c_writer, d_writer):
            writer.close()
        server.close()
        server2.close()

    asyncio.run(main())


def test_close_writer_cuts_a_close_that_cannot_flush() -> None:
    async def main() -> None:
        _, a_writer, b_reader, b_writer, server = await _pair()
        sock = a_writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a_writer.write(b"x" * (32 << 20))  # the peer never reads: the close cannot flush
        started = time.monotonic()
        await close_writer(a_writer, timeout=0.2)
        assert time.monotonic() - started < 2.0
        assert a_writer.transport.is_closing()
        # The peer sees the connection end (cut: fewer bytes than were written, then an end).
        got = await read_at_most(b_reader, 64 << 20, timeout=5.0)
        assert len(got) < 32 << 20
        b_writer.close()
        server.close()

    asyncio.run(main())


def test_read_head_and_read_at_most_stop_where_they_should() -> None:
    async def main() -> None:
        a_reader, a_writer, _b_reader, b_writer, server = await _pair()
        b_writer.write(b"HTTP/1.1 401\r\n\r\n{\"body\":1}")
        data, end, eof = await read_head(a_reader, 1024)
        assert data[:end] == b"HTTP/1.1 401\r\n\r\n" and not eof
        b_writer.write(b"more")
        assert await read_at_most(a_reader, 3, timeout=1.0) == b"mor"
        started = time.monotonic()
        assert await read_at_most(a_reader, 100, timeout=0.2) == b"e"  # what came in time
        assert time.monotonic() - started < 2.0
        b_writer.close()
        data, end, eof = await read_head(a_reader, 1024)
        assert (data, end, eof) == (b"", -1, True)
        a_writer.close()
        server.close()

    asyncio.run(main())
