"""protocol/framing.py, I/O-free: where each message on a paired connection ends.

Every stream is fed split at every boundary (and byte by byte), driven the way the relay drives
the framers: a run of body bytes handed out by ``take_opaque`` passes on by counting alone.
Whatever the split, the same heads come out and every other byte comes out once, in order.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from rendezvous.protocol.framing import (
    RAW,
    BodyReader,
    FramingError,
    RequestFramer,
    ResponseFramer,
)
from rendezvous.protocol.head import HeadError, HeadTooLarge, RequestHead

Event = tuple[str, str] | bytes

GET_A = b"GET /a HTTP/1.1\r\nHost: r\r\nAuthorization: Basic QTp4\r\n\r\n"
POST_CL = b"POST /b HTTP/1.1\r\nHost: r\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED_BODY = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
POST_CHUNKED = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY
GET_D = b"GET /d HTTP/1.1\r\n\r\n"
STREAM = GET_A + POST_CL + POST_CHUNKED + GET_D
EXPECTED: list[Event] = [("GET", "/a"), ("POST", "/b"), b"hello world", ("POST", "/c"),
                         CHUNKED_BODY, ("GET", "/d")]


def splits(data: bytes) -> Iterable[list[bytes]]:
    """``data`` whole, cut in two at every index, byte by byte, and in random pieces."""
    yield [data]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]
    yield [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), 6))
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def merged(events: list[Event]) -> list[Event]:
    """Adjacent byte events joined (how bytes are cut into events depends on the reads)."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += event
        elif not (isinstance(event, bytes) and not event):
            out.append(event)
    return out


def drive(pieces: list[bytes], framer: RequestFramer | None = None) -> list[Event]:
    """Feed ``pieces`` as the relay does; the heads (method, target) and bytes passed on."""
    framer = framer or RequestFramer(16384, 100)
    events: list[Event] = []
    left = 0
    for piece in pieces:
        if len(piece) <= left:
            left -= len(piece)
            events.append(piece)
            continue
        events.append(piece[:left])
        framer.feed(piece[left:])
        while (event := framer.next_event()) is not None:
            events.append(event if isinstance(event, bytes) else (event.method, event.target))
        left = framer.take_opaque()
    return merged(events)


def test_pipelined_requests_split_anywhere_come_out_the_same() -> None:
    for pieces in splits(STREAM):
        assert drive(pieces) == EXPECTED, pieces


def test_a_large_body_is_handed_out_for_counting() -> None:
    framer = RequestFramer(16384, 100)
    framer.feed(b"PUT /big HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10)
    head = framer.next_event()
    assert isinstance(head, RequestHead) and head.target == "/big"
    assert framer.next_event() == b"x" * 10
    assert framer.next_event() is None
    assert framer.take_opaque() == 1000000 - 10  # the rest passes by counting
    framer.feed(GET_D)  # what comes after it is a head again
    head = framer.next_event()
    assert isinstance(head, RequestHead) and head.target == "/d"


def test_head_then_the_rest_can_be_detached() -> None:
    framer = RequestFramer(16384, 100)
    framer.feed(GET_A + POST_CL)
    head = framer.next_event()
    assert isinstance(head, RequestHead) and head.target == "/a"
    assert framer.detach() == POST_CL  # nothing after a head comes out before asked for
    assert framer.next_event() is None


def test_upgrade_then_raw_after_a_101() -> None:
    upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    frame = b"\x81\x85abcd" + b"HELLO"
    framer = RequestFramer(16384, 100)
    assert drive([upgrade + frame], framer) == [("GET", "/ws"), frame]  # a frame goes on
    assert framer.awaiting_upgrade
    framer.upgrade_answered(True)
    assert framer.take_opaque() == RAW
    framer.feed(GET_D)  # raw now: even a head is just bytes
    assert framer.next_event() == GET_D


def test_a_head_after_an_upgrade_waits_for_the_answer() -> None:
    upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
    framer = RequestFramer(16384, 100)
    assert drive([upgrade + GET_D], framer) == [("GET", "/ws")]  # held
    assert framer.held and framer.take_opaque() == 0
    framer.upgrade_answered(False)  # refused: what follows is the next request
    head = framer.next_event()
    assert isinstance(head, RequestHead) and head.target == "/d"
    assert not framer.broken


def test_raw_bytes_after_a_refused_upgrade_break_the_framing() -> None:
    framer = RequestFramer(16384, 100)
    drive([b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x80abcd"], framer)
    framer.upgrade_answered(False)
    assert framer.broken


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
])
def test_framing_a_relay_must_not_guess_is_refused(head: bytes) -> None:
    framer = RequestFramer(16384, 100)
    framer.feed(head)
    with pytest.raises(HeadError):  # (llhttp itself refuses both lengths at once)
        framer.next_event()


@pytest.mark.parametrize("body", [b"zz\r\n", b"5\r\nhelloXX", b"1" * 5000])
def test_a_bad_chunked_body_is_refused(body: bytes) -> None:
    framer = RequestFramer(16384, 100)
    framer.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert isinstance(framer.next_event(), RequestHead)
    with pytest.raises(FramingError):
        while framer.next_event() is not None:
            pass


def test_a_later_head_too_large_is_refused() -> None:
    framer = RequestFramer(100, 100)
    framer.feed(b"GET / HTTP/1.1\r\nX: " + b"y" * 200)
    with pytest.raises(HeadTooLarge):
        framer.next_event()


# Responses -------------------------------------------------------------------------------

RESPONSES = [
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "POST"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY, "GET"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", "HEAD"),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET"),
    (b"HTTP/1.0 404 Not Found\r\ncontent-length: 2\r\n\r\n{}", "GET"),
]


def test_answers_are_counted_at_their_ends_split_anywhere() -> None:
    stream = b"".join(answer for answer, _ in RESPONSES)
    ends = []
    for answer, _ in RESPONSES:
        ends.append((ends[-1] if ends else 0) + len(answer))
    for pieces in splits(stream):
        framer = ResponseFramer()
        for _, method in RESPONSES:
            framer.expect(method)
        position, left = 0, 0
        for piece in pieces:
            if len(piece) <= left:
                left -= len(piece)
            else:
                framer.feed(piece[left:])
                left = framer.take_opaque()
            position += len(piece)
            # Counted exactly when its last byte has come, never before (a run handed out
            # for counting never holds an answer's last byte).
            answered = sum(1 for end in ends if end <= position)
            assert framer.outstanding == len(RESPONSES) - answered, (pieces, position)
        assert framer.outstanding == 0 and left == 0, pieces
        assert not framer.unframed and not framer.switched


def test_a_101_switches_to_raw() -> None:
    framer = ResponseFramer()
    framer.expect("GET")
    framer.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00")
    assert framer.switched and framer.take_opaque() == RAW


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
])
def test_an_answer_that_ends_at_the_close_or_is_not_http_is_unframed(answer: bytes) -> None:
    framer = ResponseFramer()
    framer.expect("GET")
    framer.feed(answer)
    assert framer.unframed and framer.outstanding == 1 and framer.take_opaque() == RAW


def test_a_body_reader_counts_and_ends() -> None:
    body = BodyReader.length(4)
    assert body.consume(b"abcdef") == 4 and body.done
    chunked = BodyReader.chunked()
    assert chunked.consume(b"3\r\nabc\r\n0\r\n\r\nGET") == 13 and chunked.done


def test_a_later_head_with_bare_line_feeds_is_refused_at_once() -> None:
    """As a first head is (the HeadReader's rule), not after the head timeout."""
    framer = RequestFramer(16384, 100)
    drive([GET_A], framer)
    framer.feed(b"GET /b HTTP/1.1\nHost: r\n\n")
    with pytest.raises(HeadError):
        framer.next_event()
