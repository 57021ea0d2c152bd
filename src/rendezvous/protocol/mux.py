"""The frames of an internal link: many forwarded clients on one connection between two nodes.

A link is one mutual-TLS connection from the node a visitor entered (the dialer) to the node
holding the hidden server's parked connection (the acceptor). Every forwarded visitor is a
*stream* on it. Each frame is a fixed 9-byte header, ``kind`` (1 byte), ``stream`` (4 bytes) and
``value`` (4 bytes), big-endian; only DATA is followed by a payload, of ``value`` bytes:

======== ====== ==================================================================
kind     stream value
======== ====== ==================================================================
OPEN     new ID flags (PROBE: "answer at once if nothing is parked here")
DATA     ID     payload length (never more than the credit the receiver granted)
EOF      ID     0: the sender will write no more on this stream (a half-close)
CLOSE    ID     0: the sender closed the stream; it reads nothing more either
WINDOW   ID     credit: the receiver has passed on this many more bytes
ACCEPT   ID     0: the acceptor takes the probed visitor (sent before any byte of it)
PING     0      0: keeps a quiet link proven alive, both ways
GOAWAY   0      0: the sender is leaving; open no more streams on this link
======== ====== ==================================================================

Only the dialer opens streams, with increasing IDs. Flow control is per stream: each side may
have at most ``window`` bytes unacknowledged in flight on a stream, so a slow visitor holds at
most a window in the other node's memory, and one stream cannot starve the others. A probe
stream that the acceptor closes before ACCEPT was refused: nothing of it reached a visitor or a
hidden server, and the dialer may send the visitor elsewhere. This module is only the wire
format (no I/O); ``server/links.py`` runs it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

HEADER: Final = struct.Struct("!BII")
HEADER_SIZE: Final = HEADER.size  # 9

OPEN: Final = 1
DATA: Final = 2
EOF: Final = 3
CLOSE: Final = 4
WINDOW: Final = 5
ACCEPT: Final = 6
PING: Final = 7
GOAWAY: Final = 8
KINDS: Final = frozenset({OPEN, DATA, EOF, CLOSE, WINDOW, ACCEPT, PING, GOAWAY})

PROBE: Final = 1  # OPEN flag

MAX_STREAM_ID: Final = 2**32 - 1

class LinkProtocolError(Exception):
    """The peer broke the link's rules (an unknown kind, more data than its credit): the link
    is closed, since nothing after such a frame can be trusted to be in step."""


def frame(kind: int, stream: int = 0, value: int = 0) -> bytes:
    """A frame without payload."""
    return HEADER.pack(kind, stream, value)


@dataclass(slots=True)
class Header:
    kind: int
    stream: int
    value: int


class FrameReader:
    """Splits what a link receives into headers and payload pieces, without waiting for a DATA
    frame's whole payload: ``feed(data)`` returns a list of ``Header`` (a frame) and
    ``(stream, bytes)`` (the next piece of that stream's current DATA payload), in order."""

    __slots__ = ("_partial", "_payload_left", "_payload_stream")

    def __init__(self) -> None:
        self._partial = bytearray()  # a header split across reads
        self._payload_stream = 0
        self._payload_left = 0  # bytes of the current DATA payload still to come

    def feed(self, data: bytes) -> list[Header | tuple[int, bytes]]:
        out: list[Header | tuple[int, bytes]] = []
        pos, size = 0, len(data)
        unpack_from = HEADER.unpack_from
        while pos < size:
            left = self._payload_left
            if left:
                take = min(left, size - pos)
                out.append((self._payload_stream,
                            data if take == size else data[pos:pos + take]))  # (pos is 0)
                pos += take
                self._payload_left = left - take
                continue
            partial = self._partial
            if partial or size - pos < HEADER_SIZE:
                need = HEADER_SIZE - len(partial)
                partial += data[pos:pos + need]
                pos += min(need, size - pos)
                if len(partial) < HEADER_SIZE:
                    break
                kind, stream, value = HEADER.unpack(partial)
                partial.clear()
            else:
                kind, stream, value = unpack_from(data, pos)
                pos += HEADER_SIZE
            if kind not in KINDS:
                raise LinkProtocolError(f"unknown frame kind {kind}")
            out.append(Header(kind, stream, value))
            if kind == DATA and value:
                self._payload_stream, self._payload_left = stream, value
        return out
