"""Reading one HTTP/1.1 request head from an untrusted peer.

We find where the head ends ourselves (the first blank line) and hand exactly those bytes to
llhttp (through httptools) to parse; everything after the head is returned untouched, because it
belongs to the hidden server (a POST body, a WebSocket frame sent with the Upgrade).
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

HEAD_END = b"\r\n\r\n"


class HeadError(Exception):
    """The peer's head cannot be served; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedHead(HeadError):
    """Not a valid HTTP/1.x request head."""

    status = 400


class HeadTooLarge(HeadError):
    """The head is longer than the size limit, or has more header lines than allowed."""

    status = 431


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

    def forwarded(self, strip_authorization: bool = True) -> bytes:
        """The head as the hidden server receives it: request line and every header except
        ``Authorization``, in the order received. (Kept when handing the request to another
        relay node, which routes by it.)"""
        lines = [f"{self.method} {self.target} HTTP/{self.version}".encode("latin-1")]
        lines.extend(k + b": " + v for k, v in self.headers
                     if not (strip_authorization and k.lower() == b"authorization"))
        return b"\r\n".join(lines) + b"\r\n\r\n"


class _Collector:
    """httptools callbacks: gather the URL and header fields of one head."""

    __slots__ = ("complete", "headers", "max_headers", "url")

    def __init__(self, max_headers: int) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.max_headers = max_headers
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_headers:
            raise HeadTooLarge("too many header lines")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def find_head_end(buffer: bytes | bytearray, max_head_size: int, search_from: int = 0) -> int:
    """Index just past the head's blank line, or -1 if the head is not complete yet.

    Raises HeadTooLarge once the head is, or would become, longer than ``max_head_size``.
    ``search_from`` lets a caller that appends data avoid rescanning what it has seen.
    """
    index = buffer.find(HEAD_END, max(0, search_from - len(HEAD_END) + 1))
    if index < 0:
        if len(buffer) > max_head_size:
            raise HeadTooLarge(f"request head longer than {max_head_size} bytes")
        return -1
    end = index + len(HEAD_END)
    if end > max_head_size:
        raise HeadTooLarge(f"request head longer than {max_head_size} bytes")
    return end


def parse_head(data: bytes, max_headers: int) -> RequestHead:
    """Parse one complete head (ending in a blank line); raise a HeadError if it is invalid."""
    collector = _Collector(max_headers)
    parser = httptools.HttpRequestParser(collector)
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
    if not collector.complete:
        raise MalformedHead("malformed request head")
    version = parser.get_http_version()
    # llhttp also takes HTTP/0.9-style lines (no version) and "HTTP/2.0": not ours to relay.
    if version not in ("1.0", "1.1") or not collector.url:
        raise MalformedHead(f"unsupported request line (HTTP/{version or '0.9'})")
    return RequestHead(
        method=parser.get_method().decode("latin-1"),
        target=collector.url.decode("latin-1"),
        version=version,
        headers=tuple(collector.headers),
        keep_alive=bool(parser.should_keep_alive()),
    )
