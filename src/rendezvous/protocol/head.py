"""Reading HTTP/1.1 request heads from an untrusted peer, in the manner of h11.

:class:`HeadReader` is fed bytes as they arrive and answers with the next complete
:class:`RequestHead` or :data:`NEED_MORE`; every limit is applied as the bytes come, each breach
raising its own :class:`~rendezvous.errors.HeadError` (which carries the HTTP status to answer).
The bytes read past a head stay in the reader as :attr:`HeadReader.trailing`, untouched, because
they belong to the hidden server (a POST body, a WebSocket frame sent with the Upgrade): the
never-lose-the-body rule lives here and nowhere else.

We find where a head ends ourselves (the first CRLF blank line) and hand exactly those bytes to
llhttp (through httptools) to parse.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import httptools

from rendezvous.config import DEFAULT_MAX_HEAD_SIZE, DEFAULT_MAX_HEADERS
from rendezvous.errors import (
    BareLineFeed,
    HeadError,
    HeadTooLarge,
    HeadTooLong,
    MalformedHead,
    TooManyHeaders,
)

__all__ = [
    "HEAD_END",
    "NEED_MORE",
    "BareLineFeed",
    "HeadError",
    "HeadReader",
    "HeadTooLarge",
    "HeadTooLong",
    "MalformedHead",
    "NeedMore",
    "RequestHead",
    "TooManyHeaders",
    "find_head_end",
    "parse_head",
]

HEAD_END = b"\r\n\r\n"
# A blank line ended by a bare LF ("\n\n", or "\r\n\n"): a client that thinks its head is
# complete, though it will never send the CRLF blank line we wait for.
_BARE_LF_END = b"\n\n"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """One parsed request head; header names and values exactly as received."""

    method: str
    target: str
    version: str  # "1.0" or "1.1"
    headers: tuple[tuple[bytes, bytes], ...]
    keep_alive: bool

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive, lower-case argument)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def is_upgrade(self) -> bool:
        """An ``Upgrade`` request (a WebSocket handshake): errors are bare and close."""
        return self.header(b"upgrade") is not None

    @property
    def content_length(self) -> int | None:
        """The declared body length, or None when absent or unparseable."""
        value = self.header(b"content-length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    @property
    def has_unframed_body(self) -> bool:
        """A body whose end we cannot find without decoding it (chunked), or may never come
        (``Expect: 100-continue``): after refusing such a request the connection must close."""
        chunked = self.header(b"transfer-encoding") is not None
        expect = (self.header(b"expect") or b"").lower() == b"100-continue"
        return chunked or (expect and bool(self.content_length))

    def forwarded(self, strip_authorization: bool = True, extra: bytes = b"") -> bytes:
        """The head as the hidden server receives it: request line and every header except
        ``Authorization``, in the order received, then ``extra`` (whole header lines, each
        ending in CRLF: the relay's own ``Forwarded``). (Authorization is kept when handing
        the request to another relay node, which routes by it.)"""
        lines = [f"{self.method} {self.target} HTTP/{self.version}".encode("latin-1")]
        lines.extend(k + b": " + v for k, v in self.headers
                     if not (strip_authorization and k.lower() == b"authorization"))
        return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


class _Collector:
    """httptools callbacks: gather the URL and header fields of one head."""

    __slots__ = ("complete", "headers", "keep_alive", "max_headers", "parser", "url")

    def __init__(self, max_headers: int) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.max_headers = max_headers
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpRequestParser | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_headers:
            raise TooManyHeaders("too many header lines")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True
        # Asked now: once a bodiless message is complete, llhttp forgets "Connection: close".
        assert self.parser is not None
        self.keep_alive = bool(self.parser.should_keep_alive())


def find_head_end(buffer: bytes | bytearray, max_head_size: int, search_from: int = 0) -> int:
    """Index just past the head's blank line, or -1 if the head is not complete yet.

    Raises HeadTooLarge once the head is, or would become, longer than ``max_head_size``.
    ``search_from`` lets a caller that appends data avoid rescanning what it has seen.
    """
    index = buffer.find(HEAD_END, max(0, search_from - len(HEAD_END) + 1))
    if index < 0:
        if len(buffer) > max_head_size:
            raise HeadTooLong(f"request head longer than {max_head_size} bytes")
        return -1
    end = index + len(HEAD_END)
    if end > max_head_size:
        raise HeadTooLong(f"request head longer than {max_head_size} bytes")
    return end


def parse_head(data: bytes, max_headers: int) -> RequestHead:
    """Parse one complete head (ending in a blank line); raise a HeadError if it is invalid."""
    collector = _Collector(max_headers)
    parser = collector.parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass  # CONNECT and Upgrade stop the parser at the head's end: what we want.
    except httptools.HttpParserCallbackError as exc:
        if isinstance(exc.__context__, HeadTooLarge):
            raise exc.__context__ from None
        raise MalformedHead("malformed request head") from exc
    except httptools.HttpParserError as exc:
        raise MalformedHead(f"malformed request head: {exc}") from exc
    finally:
        # The parser holds the collector's bound methods: without this, each head left a
        # reference cycle (six objects and the header list) for the garbage collector.
        collector.parser = None
    if not collector.complete:
        raise MalformedHead("malformed request head")
    version = parser.get_http_version()
    # llhttp also takes HTTP/0.9-style lines (no version) and "HTTP/2.0": not ours to relay.
    if version not in ("1.0", "1.1") or not collector.url:
        raise MalformedHead(f"unsupported request line (HTTP/{version or '0.9'})")
    # (Positional: a frozen dataclass's keyword call costs a fifth more, twice per pairing.)
    return RequestHead(parser.get_method().decode("latin-1"), collector.url.decode("latin-1"),
                       version, tuple(collector.headers), collector.keep_alive)


def _take_head(buffer: bytearray, scanned: int, max_head_size: int,
               max_headers: int) -> tuple[RequestHead | None, int]:
    """The head at the start of ``buffer``, removed from it, and its size in bytes; or None and
    how much of the buffer is now searched (pass it back as ``scanned`` with more bytes).

    :class:`HeadReader`'s step (which the relay's RequestFramer reads later requests on a
    pairing with, too): raises HeadTooLong, TooManyHeaders, BareLineFeed or MalformedHead.
    """
    too_long: HeadTooLong | None = None
    try:
        end = find_head_end(buffer, max_head_size, scanned)
    except HeadTooLong as exc:
        end, too_long = -1, exc
    # A bare-LF blank line counts only inside the head (a body may hold "\n\n") and within the
    # size limit, so the answer does not depend on how the bytes were split into reads.
    bound = end if end >= 0 else min(len(buffer), max_head_size)
    if buffer.find(_BARE_LF_END, max(0, scanned - 1), bound) >= 0:
        raise BareLineFeed("request head lines must end in CRLF, not a bare LF")
    if too_long is not None:
        raise too_long
    if end < 0:
        return None, len(buffer)
    # (The usual read is one whole head: copied once, not sliced and then copied.)
    head = parse_head(bytes(buffer) if end == len(buffer) else bytes(buffer[:end]), max_headers)
    del buffer[:end]
    return head, end


class NeedMore(enum.Enum):
    """The type of :data:`NEED_MORE` (an enum, so ``is NEED_MORE`` narrows for type checkers)."""

    NEED_MORE = "need more"

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore.NEED_MORE
"""What :meth:`HeadReader.feed` returns while no complete head is buffered: feed more bytes."""


class HeadReader:
    """Request heads out of a byte stream, one at a time, with the relay's limits applied.

    ``feed(data)`` adds bytes and returns the next complete head, or :data:`NEED_MORE`. What was
    read past that head stays in :attr:`trailing` (a body, a pipelined request) until the caller
    takes it (:meth:`take_trailing`: it belongs to the hidden server) or asks for the next head
    (``feed()``, after :meth:`skip` of the body of a request it answered itself). A
    :class:`~rendezvous.errors.HeadError` means the peer cannot be served: answer its
    ``status`` and close.

    The reader searches only bytes it has not searched before, so a head arriving in many small
    reads costs no more than one arriving whole.
    """

    __slots__ = ("_buffer", "_scanned", "_skip", "head_size", "max_head_size", "max_headers")

    def __init__(self, max_head_size: int = DEFAULT_MAX_HEAD_SIZE,
                 max_headers: int = DEFAULT_MAX_HEADERS) -> None:
        self.max_head_size = max_head_size
        self.max_headers = max_headers
        self._buffer = bytearray()
        self._scanned = 0  # how much of the buffer was searched for the head's end
        self._skip = 0  # body bytes of an answered request still to discard
        self.head_size = 0  # bytes of the last head returned, blank line included

    def feed(self, data: bytes | bytearray = b"") -> RequestHead | NeedMore:
        """Add ``data`` (may be empty) and return the next complete head, or NEED_MORE.

        Raises HeadTooLong, TooManyHeaders, BareLineFeed or MalformedHead (all HeadError).
        """
        if data:
            self._buffer += data
        return self.next_head()

    def receive(self, data: bytes | bytearray) -> None:
        """Buffer ``data`` without looking for a head (while the caller cannot answer one, or
        once the bytes are a body on its way to the hidden server)."""
        self._buffer += data

    def next_head(self) -> RequestHead | NeedMore:
        """The next complete head in what was fed, or NEED_MORE (raises as :meth:`feed`)."""
        buffer = self._buffer
        if self._skip:
            dropped = min(self._skip, len(buffer))
            self._skip -= dropped
            del buffer[:dropped]
        if self._skip or not buffer:
            return NEED_MORE
        head, count = _take_head(buffer, self._scanned, self.max_head_size, self.max_headers)
        if head is None:
            self._scanned = count
            return NEED_MORE
        self._scanned = 0
        self.head_size = count
        return head

    def skip(self, count: int) -> None:
        """Discard the next ``count`` bytes (the body of a request answered without the hidden
        server) before looking for the next head."""
        self._skip += count

    @property
    def trailing(self) -> bytearray:
        """The bytes fed and not yet consumed: past the last head returned, or of a head still
        incomplete. Read-only to callers; :meth:`take_trailing` hands them on."""
        return self._buffer

    def take_trailing(self) -> bytearray:
        """Return :attr:`trailing` and start over with an empty buffer."""
        taken, self._buffer = self._buffer, bytearray()
        self._scanned = 0
        return taken
