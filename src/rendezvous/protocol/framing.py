"""Where each HTTP/1.1 message on a paired connection ends, without touching its bytes.

After pairing, a mobile client may send several requests on its connection, and they may name
different hidden servers (docs/protocol.md §2). The relay therefore follows the framing of both
directions: :class:`RequestFramer` splits the client's stream into request heads (which the
relay routes and rewrites) and the bytes that pass on unchanged (bodies, chunk framing
included), and :class:`ResponseFramer` counts the hidden server's answers so the relay knows
when every request it passed on has been answered in full (only then may another hidden
server, or the relay itself, answer the next one) and when a ``101`` makes the stream raw.

Both are I/O-free: bytes in, decisions out. Both hand the caller long runs of body bytes
(:meth:`take_opaque`) so that the caller can pass them on by counting alone: the relay's hot
path stays "count and write".
"""

from __future__ import annotations

from collections import deque

from rendezvous.errors import FramingError as FramingError  # raised here, caught by the relay
from rendezvous.protocol.head import NEED_MORE, HeadReader, RequestHead
from rendezvous.protocol.responses import MAX_RESPONSE_HEAD

# Stands for "every byte from here on": a stream that is raw (after a 101, or a body that ends
# at the close) never reaches it.
RAW = 1 << 62

# A chunk-size line (hex size plus extensions) longer than this is not a client's: refuse it.
MAX_CHUNK_LINE = 4096

# Body kinds.
_LENGTH = 0  # ``left`` bytes, then done
_CHUNK_LINE = 1  # reading a chunk-size line
_CHUNK_DATA = 2  # ``left`` bytes of chunk data, then its CRLF
_CHUNK_CRLF = 3  # the CRLF after chunk data (``left`` of its 2 bytes still to come)
_TRAILER = 4  # trailer lines until an empty one
_UNTIL_CLOSE = 5  # every byte until the stream ends (raw)


class BodyReader:
    """Follows one message body's framing (Content-Length, chunked, or until the close).

    :meth:`consume` takes the next bytes of the stream and says how many of them belong to
    the body; :attr:`done` says whether the body has ended.
    """

    __slots__ = ("_line", "_state", "_trailer_size", "done", "left")

    def __init__(self, state: int, left: int = 0) -> None:
        self._state = state
        self.left = left
        self._line = bytearray()  # a chunk-size or trailer line read so far
        self._trailer_size = 0
        self.done = state == _LENGTH and left == 0

    @classmethod
    def length(cls, size: int) -> BodyReader:
        """A body of ``size`` bytes."""
        return cls(_LENGTH, size)

    @classmethod
    def chunked(cls) -> BodyReader:
        """A ``Transfer-Encoding: chunked`` body, its framing passed on as it is."""
        return cls(_CHUNK_LINE)

    @classmethod
    def until_close(cls) -> BodyReader:
        """A body that ends only when the stream does (raw bytes)."""
        return cls(_UNTIL_CLOSE, RAW)

    @property
    def opaque(self) -> int:
        """How many of the next bytes are surely body, to pass on without looking at them."""
        return self.left if self._state in (_LENGTH, _CHUNK_DATA, _UNTIL_CLOSE) else 0

    @property
    def opaque_but_last(self) -> int:
        """:attr:`opaque` short of the body's last byte, so that whoever follows the body
        sees it end (a run of chunk data is never the last: the chunk framing follows)."""
        return self.left - 1 if self._state == _LENGTH and self.left else self.opaque

    def skip(self, size: int) -> None:
        """``size`` of the :attr:`opaque` bytes were passed on by the caller itself."""
        if not size or self._state == _UNTIL_CLOSE:
            return
        self.left -= size
        if not self.left:
            if self._state == _LENGTH:
                self.done = True
            else:  # chunk data complete: its CRLF follows
                self._state, self.left = _CHUNK_CRLF, 2

    def consume(self, data: bytes | bytearray | memoryview, start: int = 0) -> int:
        """The index in ``data`` just past the body bytes that start at ``start``: ``len(data)``
        while the body goes on, less once it has ended. Raises FramingError."""
        end = len(data)
        pos = start
        while pos < end and not self.done:
            state = self._state
            if state in (_LENGTH, _CHUNK_DATA):
                take = min(self.left, end - pos)
                pos += take
                self.skip(take)
            elif state == _UNTIL_CLOSE:
                return end
            elif state == _CHUNK_CRLF:
                expected = b"\r\n"[2 - self.left:]
                got = bytes(data[pos:pos + len(expected)])
                if not expected.startswith(got):
                    raise FramingError("chunk data not followed by CRLF")
                pos += len(got)
                self.left -= len(got)
                if not self.left:
                    self._state = _CHUNK_LINE
            else:  # a line: chunk size or trailer
                newline = _find(data, b"\n", pos, end)
                stop = end if newline < 0 else newline + 1
                self._line += data[pos:stop]
                pos = stop
                limit = MAX_CHUNK_LINE if state == _CHUNK_LINE else MAX_RESPONSE_HEAD
                if len(self._line) + self._trailer_size > limit:
                    raise FramingError("chunk-size line or trailer too long")
                if newline >= 0:
                    self._end_line(bytes(self._line))
                    self._line.clear()
        return pos

    def _end_line(self, line: bytes) -> None:
        if self._state == _CHUNK_LINE:
            text = line.partition(b";")[0].strip(b" \t\r\n")
            if not text or len(text) > 16 or text.strip(b"0123456789abcdefABCDEF"):
                raise FramingError("invalid chunk size")
            size = int(text, 16)
            if size:
                self._state, self.left = _CHUNK_DATA, size
            else:
                self._state = _TRAILER
        elif line in (b"\r\n", b"\n"):  # the empty line that ends the trailers
            self.done = True
        else:
            self._trailer_size += len(line)


def _starts_a_head(byte: int) -> bool:
    """Whether a request line may start with ``byte`` (a method is letters; llhttp also lets
    an empty line come first)."""
    return 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A or byte in (0x0D, 0x0A)


def _find(data: bytes | bytearray | memoryview, needle: bytes, start: int, end: int) -> int:
    if isinstance(data, memoryview):
        found = bytes(data[start:end]).find(needle)
        return found + start if found >= 0 else -1
    return data.find(needle, start, end)


def _header_values(headers: tuple[tuple[bytes, bytes], ...], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _content_length(values: list[bytes]) -> int | None:
    """One length from every Content-Length value (``5, 5`` is 5); None if they disagree or
    are not numbers."""
    sizes = {part.strip() for value in values for part in value.split(b",")}
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return int(size) if size.isdigit() and len(size) <= 18 else None


def _is_chunked(values: list[bytes]) -> bool:
    """Whether chunked is the last transfer coding (RFC 9112 §6.3)."""
    codings = [part.strip().lower() for value in values for part in value.split(b",")]
    return bool(codings) and codings[-1] == b"chunked"


def request_body(head: RequestHead) -> BodyReader:
    """How the body of a request with ``head`` is framed (RFC 9112 §6.3). Raises FramingError
    for framing a relay must not guess at (both lengths, a coding that is not chunked)."""
    codings = _header_values(head.headers, b"transfer-encoding")
    lengths = _header_values(head.headers, b"content-length")
    if codings:
        if lengths:
            raise FramingError("both Transfer-Encoding and Content-Length")
        if not _is_chunked(codings):
            raise FramingError("request body not chunked last")
        return BodyReader.chunked()
    if lengths:
        size = _content_length(lengths)
        if size is None:
            raise FramingError("invalid Content-Length")
        return BodyReader.length(size)
    return BodyReader.length(0)


class RequestFramer:
    """Splits a client's byte stream into request heads and the bytes that pass on as they are.

    Feed it with :meth:`feed`, then call :meth:`next_event` until it returns None: each event is
    either bytes to pass on (part of a body, in order, never altered) or a :class:`RequestHead`
    for the caller to route. Nothing after a head is returned until the caller calls
    :meth:`next_event` again, so it may first decide that the rest goes elsewhere
    (:meth:`detach`). Heads are read by a :class:`HeadReader`, with the relay's limits, as a
    first request's are.

    After an ``Upgrade`` request (and its body) the answer decides what the next bytes are:
    :meth:`upgrade_answered` says whether it was ``101``. Until then, bytes that start like a
    request head are held (a next request must not reach the server before we know it is
    one), and bytes that cannot (a WebSocket frame sent with the Upgrade: its first byte is
    never a letter) pass on at once as raw bytes; if the answer then is not ``101`` the stream
    cannot be followed any more and :attr:`broken` turns true.
    """

    __slots__ = ("_body", "_buffer", "_held", "_raw", "_reader", "_speculative", "_upgrade",
                 "broken")

    def __init__(self, max_head_size: int, max_headers: int) -> None:
        # Bytes fed and not yet returned: in the reader while a head comes next, else here.
        self._reader = HeadReader(max_head_size, max_headers)
        self._buffer = bytearray()
        self._body: BodyReader | None = None  # None: a head comes next
        self._upgrade = False  # the current request asks for an Upgrade
        self._held = False  # waiting for the answer to an Upgrade request
        self._speculative = False  # ... and passing raw bytes meanwhile
        self._raw = False  # switched protocols: every byte passes
        self.broken = False  # raw bytes went on, then the Upgrade was refused

    @property
    def held(self) -> bool:
        """Whether bytes are being held until the answer to an Upgrade request."""
        return self._held

    @property
    def awaiting_upgrade(self) -> bool:
        """Whether the last request asked for an Upgrade and its answer has not come."""
        return self._upgrade

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned (a head in the making, or held bytes)."""
        return len(self._buffer) + len(self._reader.trailing)

    def begin(self, head: RequestHead, body: BodyReader | None = None) -> None:
        """Follow the body of ``head``, a head the caller parsed itself (the first one);
        ``body``: its :func:`request_body`, if the caller has it already."""
        self._body = request_body(head) if body is None else body
        self._upgrade = head.is_upgrade

    def feed(self, data: bytes | bytearray) -> None:
        """Add the next bytes of the stream."""
        if self._wants_head:
            self._reader.receive(data)
        else:
            self._buffer += data

    @property
    def _wants_head(self) -> bool:
        return self._body is None and not (self._raw or self._held or self._speculative)

    def next_event(self) -> bytes | RequestHead | None:
        """The next bytes to pass on, or the next head, or None when more input is needed.
        Raises HeadError (FramingError included) on a head or a body it cannot follow."""
        buffer = self._buffer
        if self._raw or self._speculative:
            return self._take(len(buffer)) if buffer else None
        if self._held:
            if buffer and not _starts_a_head(buffer[0]):
                self._speculative = True
                return self._take(len(buffer))
            return None
        body = self._body
        if body is not None:
            if body.done:
                self._body = None
                self._held = self._upgrade
                self._to_reader()
                return self.next_event()
            return self._take(body.consume(buffer)) if buffer else None
        head = self._reader.next_head()
        if head is NEED_MORE:
            return None
        self._buffer = self._reader.take_trailing()
        self.begin(head)
        return head

    def take_opaque(self) -> int:
        """Hand the caller the next run of body bytes: that many of the coming bytes it passes
        on itself, without feeding them here. 0 while anything is buffered."""
        if self._buffer or self._reader.trailing:
            return 0
        if self._raw or self._speculative:
            return RAW
        body = self._body
        if self._held or body is None:
            return 0
        size = body.opaque
        body.skip(size)
        return size

    def upgrade_answered(self, switched: bool) -> None:
        """The answer to the Upgrade request came: ``101`` (every byte from now on is raw) or
        another status (the next bytes are a request head again, unless raw bytes went on
        meanwhile: then :attr:`broken`)."""
        self._held = self._upgrade = False
        self._raw = switched
        self.broken = self._speculative and not switched
        self._to_reader()

    def detach(self) -> bytearray:
        """Every byte fed and not yet returned; the framer is empty afterwards."""
        rest, self._buffer = self._buffer, bytearray()
        rest += self._reader.take_trailing()  # (one of the two is empty)
        return rest

    def _to_reader(self) -> None:
        """A head comes next: what is buffered goes to the head reader."""
        if self._wants_head and self._buffer:
            self._reader.receive(self._buffer)
            self._buffer = bytearray()

    def _take(self, size: int) -> bytes:
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk


class ResponseFramer:
    """Follows a hidden server's answers to the requests passed on to it, bytes untouched.

    Tell it of each request passed on (:meth:`expect`), feed it what the hidden server sends
    (after passing that on): :attr:`outstanding` counts the requests not yet answered in full;
    :attr:`switched` turns true at a ``101``. A stream it cannot follow (not HTTP, a body that
    ends at the close) makes it :attr:`unframed`: from then on nothing is answered in full.
    """

    __slots__ = ("_body", "_head", "_requests", "switched", "unframed")

    def __init__(self) -> None:
        self._requests: deque[str] = deque()  # methods of the requests not answered in full
        self._head = bytearray()  # a response head in the making
        self._body: BodyReader | None = None
        self.switched = False
        self.unframed = False

    @property
    def outstanding(self) -> int:
        """Requests passed on whose answer has not ended yet."""
        return len(self._requests)

    def expect(self, method: str) -> None:
        """A request with ``method`` was passed on."""
        self._requests.append(method)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Account for the next bytes the hidden server sent."""
        pos, end = 0, len(data)
        while pos < end and not self.switched and not self.unframed:
            body = self._body
            if body is not None:
                pos = body.consume(data, pos)
                if body.done:
                    self._body = None
                    if self._requests:
                        self._requests.popleft()
                continue
            head = self._head
            before = len(head)
            # (A head never needs more than the limit: no copy of a body that follows it.)
            head += data[pos:pos + MAX_RESPONSE_HEAD + 4 - before]
            index = head.find(b"\r\n\r\n", max(0, before - 3))
            if index < 0:
                if len(head) > MAX_RESPONSE_HEAD:
                    self.unframed = True
                    return
                pos = end
                continue
            pos += index + 4 - before
            text = bytes(head[:index + 4])
            head.clear()
            self._start(text)

    def take_opaque(self) -> int:
        """Hand the caller the next run of body bytes, as :meth:`RequestFramer.take_opaque`;
        never an answer's last byte, so that its end is always fed here and counted."""
        if self.switched or self.unframed:
            return RAW
        body = self._body
        if body is None or self._head:
            return 0
        size = body.opaque_but_last
        body.skip(size)
        return size

    def _start(self, head: bytes) -> None:
        """A response head has come: how its body is framed (RFC 9112 §6.3)."""
        status_line, _, rest = head.partition(b"\r\n")
        parts = status_line.split(None, 2)
        if (len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit()
                or len(parts[1]) != 3):
            self.unframed = True
            return
        status = int(parts[1])
        if status == 101:
            self.switched = True
            return
        if status < 200:  # 100 Continue and other interim answers: the final one follows
            return
        method = self._requests[0] if self._requests else "GET"
        # Only two headers frame the body: the lines are looked at only if either name is in
        # the head at all, and then only for those two (a third of a small answer's cost).
        codings: list[bytes] = []
        lengths: list[bytes] = []
        lower = rest.lower()
        if b"transfer-encoding" in lower or b"content-length" in lower:
            for line in lower.split(b"\r\n"):
                name, _, value = line.partition(b":")
                name = name.strip()
                if name == b"content-length":
                    lengths.append(value.strip())
                elif name == b"transfer-encoding":
                    codings.append(value.strip())
        if method == "HEAD" or status in (204, 304):
            body = BodyReader.length(0)
        elif codings:
            body = BodyReader.chunked() if _is_chunked(codings) else BodyReader.until_close()
        elif lengths:
            size = _content_length(lengths)
            body = BodyReader.length(size) if size is not None else BodyReader.until_close()
        else:
            body = BodyReader.until_close()
        if body.opaque == RAW:
            self.unframed = True  # it ends at the close: no later answer can be told apart
            return
        if body.done:
            if self._requests:
                self._requests.popleft()
            return
        self._body = body
