"""HeadReader, I/O-free: heads fed whole, byte by byte or split anywhere give the same result;
every limit raises its own HeadError with its status; the bytes past a head are never lost."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rendezvous.errors import RendezvousError
from rendezvous.protocol.head import (
    NEED_MORE,
    BareLineFeed,
    HeadError,
    HeadReader,
    HeadTooLarge,
    HeadTooLong,
    MalformedHead,
    NeedMore,
    RequestHead,
    TooManyHeaders,
)

HEAD = b"POST /upload?x=1 HTTP/1.1\r\nHost: relay\r\nContent-Length: 11\r\n\r\n"
BODY = b"hello world"


def feed_bytewise(reader: HeadReader, data: bytes) -> list[RequestHead | NeedMore]:
    return [reader.feed(data[i:i + 1]) for i in range(len(data))]


def test_a_whole_head_with_its_body_keeps_the_body_as_trailing() -> None:
    reader = HeadReader()
    head = reader.feed(HEAD + BODY)
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version) == ("POST", "/upload?x=1", "1.1")
    assert head.header(b"host") == b"relay" and head.content_length == 11
    assert reader.head_size == len(HEAD)
    assert bytes(reader.trailing) == BODY
    assert bytes(reader.take_trailing()) == BODY
    assert reader.trailing == b"" and reader.feed() is NEED_MORE


def test_byte_by_byte_needs_more_until_the_last_byte_of_the_blank_line() -> None:
    reader = HeadReader()
    results = feed_bytewise(reader, HEAD)
    assert all(result is NEED_MORE for result in results[:-1])
    assert isinstance(results[-1], RequestHead)
    assert results[-1] == HeadReader().feed(HEAD)
    assert reader.trailing == b""
    assert reader.feed(BODY) is NEED_MORE  # no head in a body: it stays, untouched
    assert bytes(reader.trailing) == BODY


def test_pipelined_heads_come_one_at_a_time_after_skipping_an_answered_body() -> None:
    second = b"GET /next HTTP/1.1\r\n\r\n"
    reader = HeadReader()
    first = reader.feed(HEAD + BODY[:4])
    assert isinstance(first, RequestHead) and first.target == "/upload?x=1"
    reader.skip(first.content_length or 0)  # answered ourselves: its body is not a head
    assert reader.feed() is NEED_MORE  # only 4 of its 11 body bytes so far
    head = reader.feed(BODY[4:] + second + b"tail")
    assert isinstance(head, RequestHead) and head.target == "/next"
    assert bytes(reader.trailing) == b"tail"


def test_receive_buffers_without_looking_for_a_head() -> None:
    reader = HeadReader()
    reader.receive(b"GET / HTTP/1.1\r\n\r\n")
    assert bytes(reader.trailing) == b"GET / HTTP/1.1\r\n\r\n"
    assert isinstance(reader.next_head(), RequestHead)


@pytest.mark.parametrize("bytewise", [False, True])
def test_the_size_limit_is_exact(bytewise: bool) -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * 50 + b"\r\n\r\n"
    fits = HeadReader(max_head_size=len(head))
    result = feed_bytewise(fits, head)[-1] if bytewise else fits.feed(head)
    assert isinstance(result, RequestHead)
    reader = HeadReader(max_head_size=len(head) - 1)
    with pytest.raises(HeadTooLong) as raised:
        if bytewise:
            feed_bytewise(reader, head)
        else:
            reader.feed(head)
    assert raised.value.status == 431 and isinstance(raised.value, HeadTooLarge)


def test_an_unfinished_head_over_the_limit_fails_before_its_end_arrives() -> None:
    reader = HeadReader(max_head_size=100)
    assert reader.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 70) is NEED_MORE
    with pytest.raises(HeadTooLong):
        reader.feed(b"a" * 20)


def test_the_header_count_limit_is_exact() -> None:
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(5))
    head = b"GET / HTTP/1.1\r\n" + lines + b"\r\n"
    result = HeadReader(max_headers=5).feed(head)
    assert isinstance(result, RequestHead) and len(result.headers) == 5
    with pytest.raises(TooManyHeaders) as raised:
        HeadReader(max_headers=4).feed(head)
    assert raised.value.status == 431 and isinstance(raised.value, HeadTooLarge)


def test_a_malformed_head_is_a_400() -> None:
    with pytest.raises(MalformedHead) as raised:
        HeadReader().feed(b"GET / HTTP/2.0\r\n\r\n")
    assert raised.value.status == 400


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\nHost: x\n\n",  # all bare LF
    b"GET / HTTP/1.1\r\nHost: x\r\n\n",  # CRLF lines, bare-LF blank line
])
def test_a_bare_lf_head_is_refused_at_once_not_after_the_timeout(head: bytes) -> None:
    with pytest.raises(BareLineFeed) as raised:
        HeadReader().feed(head)
    assert raised.value.status == 400 and isinstance(raised.value, MalformedHead)
    reader = HeadReader()
    assert all(result is NEED_MORE for result in feed_bytewise(reader, head[:-1]))
    with pytest.raises(BareLineFeed):  # on the byte that ends the bare blank line
        reader.feed(head[-1:])


def test_lf_lf_in_a_body_is_not_a_bare_lf_head() -> None:
    reader = HeadReader()
    head = reader.feed(HEAD + b"a\n\nb")
    assert isinstance(head, RequestHead) and bytes(reader.trailing) == b"a\n\nb"
    reader = HeadReader()
    assert isinstance(feed_bytewise(reader, HEAD)[-1], RequestHead)
    for byte in b"\n\n":  # the body, buffered on its way to the hidden server
        reader.receive(bytes([byte]))
    assert bytes(reader.trailing) == b"\n\n"


def test_head_errors_sit_in_the_package_tree() -> None:
    for error in (HeadTooLong, TooManyHeaders, MalformedHead, BareLineFeed):
        assert issubclass(error, HeadError) and issubclass(error, RendezvousError)


def _outcome(reader: HeadReader, chunks: list[bytes]) -> tuple[list[object], bytes | None]:
    """What a reader makes of ``chunks``: each head in turn (skipping its body), then the error
    class that ended reading with None, or else the bytes left over."""
    results: list[object] = []
    try:
        for chunk in chunks:
            result = reader.feed(chunk)
            while isinstance(result, RequestHead):
                results.append(result)
                reader.skip(result.content_length or 0)
                result = reader.feed()
    except HeadError as exc:
        # An error ends reading: what is left then depends on where it was noticed.
        return [*results, type(exc)], None
    return results, bytes(reader.trailing)


pieces = st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b"GET / HTTP/1.1", b": ", b"\r\n\r\n",
                          b"Content-Length: 3\r\n", b"Host: h\r\n", b"abc"])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(pieces, max_size=30), cuts=st.lists(st.integers(0, 300), max_size=8),
       max_head_size=st.integers(8, 200))
def test_how_the_bytes_are_split_never_changes_the_outcome(
        parts: list[bytes], cuts: list[int], max_head_size: int) -> None:
    data = b"".join(parts)
    bounds = [0, *sorted({min(cut, len(data)) for cut in cuts}), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    whole = _outcome(HeadReader(max_head_size, 10), [data])
    assert _outcome(HeadReader(max_head_size, 10), chunks) == whole
    assert _outcome(HeadReader(max_head_size, 10), [bytes([b]) for b in data]) == whole


@pytest.mark.parametrize(("head", "keep_alive"), [
    (b"GET / HTTP/1.1\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),  # llhttp forgets it by the end
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\n", False),
])
def test_keep_alive_follows_the_connection_header(head: bytes, keep_alive: bool) -> None:
    result = HeadReader().feed(head)
    assert isinstance(result, RequestHead) and result.keep_alive is keep_alive


def test_later_requests_on_a_pairing_are_read_by_the_same_rules() -> None:
    from rendezvous.protocol.framing import RequestFramer

    framer = RequestFramer(max_head_size=64, max_headers=2)
    framer.feed(b"GET /1 HTTP/1.1\r\n\r\n")
    first = framer.next_event()
    assert isinstance(first, RequestHead) and first.target == "/1"
    framer.feed(b"GET /2 HTTP/1.1\nHost: r\n\n")
    with pytest.raises(BareLineFeed):
        framer.next_event()
    framer = RequestFramer(max_head_size=64, max_headers=2)
    framer.feed(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    with pytest.raises(TooManyHeaders):
        framer.next_event()
