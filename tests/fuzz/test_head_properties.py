"""Property tests of the code every stranger's first bytes reach: ``find_head_end``,
``parse_head``, ``route`` and ``RequestHead.forwarded``, alone and inside a live relay.

For any bytes, parsing ends in a RequestHead or a HeadError (never another exception); routing a
parsed head never raises; the head forwarded to a hidden server never carries Authorization and
parses back to the same head. A live relay answers any bytes with an HTTP error or a close within
its head timeout, leaks nothing, and keeps pairing.
"""

from __future__ import annotations

import base64
import socket
import string
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults.relay_checks import (
    HEAD_END,
    KNOWN_ROUTE_CRASHER_IDS,
    KNOWN_ROUTE_CRASHERS,
    LoopErrors,
    Snapshot,
    assert_pairing_works,
    idle_snapshot,
    read_to_close,
    reset,
    wait_for_baseline,
)
from harness import ServerThread, running_server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rendezvous.config import GuessLimits
from rendezvous.protocol.head import (
    HeadError,
    HeadTooLarge,
    MalformedHead,
    RequestHead,
    find_head_end,
    parse_head,
)
from rendezvous.protocol.proxy import starts_with_proxy
from rendezvous.protocol.routing import Challenge, Pair, Park, Refuse, route
from rendezvous.registry import Entry

pytestmark = pytest.mark.timeout(120)

PURE = settings(max_examples=400, deadline=None)
LIVE = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

MAX_HEAD_SIZE = 16 * 1024
MAX_HEADERS = 100


# Strategies ---------------------------------------------------------------------------------

ID_CHARS = string.ascii_letters + string.digits + "._~-"
TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"]

ids = st.one_of(st.uuids().map(str), st.text(ID_CHARS, min_size=1, max_size=40))
digits = st.text("0123456789", max_size=10)
# Any latin-1 text, control characters (CR, LF, NUL) included: what a hostile peer sends.
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=40)
# What a field value may hold (RFC 9110 field-vchar, SP, HTAB, obs-text), without edge blanks.
field_value = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60).map(lambda text: text.strip(" \t"))
url_text = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


@st.composite
def targets(draw: st.DrawFn) -> str:
    uuid = draw(ids)
    kind = draw(st.integers(0, 8))
    if kind == 0:
        return f"uuid:{uuid}?response={draw(digits)}"
    if kind == 1:
        return f"uuid:{uuid}"
    if kind == 2:
        return f"uuid:{uuid}?{draw(url_text)}"
    if kind == 3:
        return f"/{draw(url_text)}?rendezvous={uuid}"
    if kind == 4:
        return f"http://{draw(url_text)}/{draw(url_text)}"
    if kind == 5:
        return "*"
    if kind == 6:
        return f"{draw(url_text)}:{draw(st.integers(0, 70000))}"
    if kind == 7:
        return draw(any_text)
    return "/" + draw(url_text)


@st.composite
def digest_values(draw: st.DrawFn) -> str:
    keys = ["username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce", "opaque",
            "algorithm"]
    fields = []
    for _ in range(draw(st.integers(0, 8))):
        key = draw(st.one_of(st.sampled_from(keys), st.text(TCHAR, max_size=10)))
        value = draw(st.one_of(
            ids.map(lambda v: f'"{v}"'),
            ids,
            st.just(""),
            st.just('""'),
            field_value.map(lambda v: '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'),
            field_value,
        ))
        fields.append(draw(st.sampled_from([f"{key}={value}", f"{key} = {value}", key, value])))
    scheme = draw(st.sampled_from(["Digest", "digest", "DIGEST", "Digest "]))
    return scheme + " " + draw(st.sampled_from([", ", ",", " , "])).join(fields)


@st.composite
def basic_values(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        user, password = draw(st.text(max_size=20)), draw(st.text(max_size=20))
        credentials = f"{user}:{password}".encode()
        return "Basic " + base64.b64encode(credentials).decode()
    if kind == 1:
        return "Basic " + base64.b64encode(draw(st.binary(max_size=30))).decode()
    if kind == 2:
        return "Basic " + draw(field_value)
    return draw(st.sampled_from(["Basic", "basic", "BASIC"])) + " " + draw(any_text)


authorizations = st.one_of(
    digest_values(), basic_values(), field_value,
    st.sampled_from(["Bearer abc", "Negotiate", "", "Digest", "Basic"]))

header_names = st.one_of(
    st.sampled_from(["Host", "Authorization", "authorization", "AUTHORIZATION", "Upgrade",
                     "Connection", "Content-Length", "Transfer-Encoding", "Expect",
                     "User-Agent", "Accept"]),
    st.text(TCHAR, min_size=1, max_size=20))


@st.composite
def headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    found = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(header_names)
        if name.lower() == "authorization":
            value = draw(authorizations)
        elif name.lower() == "content-length":
            value = draw(st.one_of(st.integers(0, 10**6).map(str), field_value))
        else:
            value = draw(field_value)
        found.append((name, value))
    return found


@st.composite
def clean_heads(draw: st.DrawFn) -> tuple[bytes, str, str, list[tuple[str, str]]]:
    """A well-formed head: (bytes, method, target, headers)."""
    method = draw(st.sampled_from(METHODS))
    target = draw(targets().filter(lambda t: t and all(0x21 <= ord(c) <= 0x7E for c in t)))
    version = draw(st.sampled_from(["1.1", "1.0"]))
    fields = draw(headers())
    fields = [(name, value.strip(" \t")) for name, value in fields]
    lines = [f"{method} {target} HTTP/{version}"] + [f"{n}: {v}" for n, v in fields]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return raw, method, target, fields


@st.composite
def rough_heads(draw: st.DrawFn) -> bytes:
    """A head built from realistic parts put together carelessly: odd methods, versions,
    separators and line ends, control characters in values."""
    method = draw(st.one_of(st.sampled_from([*METHODS, "get", "PRI", "SOURCE", ""]),
                            st.text(TCHAR, max_size=8)))
    target = draw(targets())
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.",
                                    "http/1.1", "", "HTTP/1.1 extra"]))
    newline = draw(st.sampled_from(["\r\n", "\n", "\r\n", "\r\n"]))
    separator = draw(st.sampled_from([": ", ":", " : ", ":\t", ": \t "]))
    fields = draw(headers())
    if draw(st.booleans()):
        fields.append((draw(any_text), draw(any_text)))
    lines = [" ".join(part for part in (method, target, version) if part or draw(st.booleans()))]
    lines += [f"{name}{separator}{value}" for name, value in fields]
    raw = (newline.join(lines) + newline + newline).encode("latin-1")
    return raw + draw(st.binary(max_size=30))


# Checks -------------------------------------------------------------------------------------

def check_head(head: RequestHead, max_headers: int) -> None:
    """Invariants of every head parse_head returns."""
    assert head.method and head.method == head.method.upper()
    assert head.version in ("1.0", "1.1")
    assert len(head.headers) <= max_headers
    for name, value in head.headers:
        assert isinstance(name, bytes) and isinstance(value, bytes)
        assert b"\r" not in name + value and b"\n" not in name + value


def check_route(head: RequestHead) -> None:
    """route() decides, never raises, and its decision fits the head."""
    decision = route(head)
    if isinstance(decision, Park):
        assert head.method == "CONNECT"
        assert isinstance(decision.uuid, str) and isinstance(decision.token, str)
    elif isinstance(decision, Pair):
        assert head.method != "CONNECT"
        assert decision.uuid and isinstance(decision.uuid, str)
    elif isinstance(decision, Refuse):
        assert decision.status in (400, 403, 407)
        assert decision.diagnostic
    else:
        assert isinstance(decision, Challenge)
        assert head.method != "CONNECT"


def check_forwarded(head: RequestHead) -> None:
    """The forwarded head has no Authorization and parses back to the same head."""
    forwarded = head.forwarded()
    lines = forwarded.split(b"\r\n")
    assert forwarded.endswith(HEAD_END) and forwarded.count(HEAD_END) == 1
    names = [line.split(b":", 1)[0].strip().lower() for line in lines[1:] if line]
    assert b"authorization" not in names, forwarded
    again = parse_head(forwarded, MAX_HEADERS)
    assert again.header(b"authorization") is None
    kept = tuple((k, v) for k, v in head.headers if k.lower() != b"authorization")
    assert (again.method, again.target, again.version) == (head.method, head.target,
                                                          head.version)
    assert again.headers == kept
    assert again.keep_alive == head.keep_alive
    assert again.forwarded() == forwarded


def parse_all(data: bytes, max_head_size: int = MAX_HEAD_SIZE,
              max_headers: int = MAX_HEADERS) -> RequestHead | None:
    """The relay's path for the first head in ``data``; None when incomplete or refused as a
    HeadError. Anything else raised fails the test."""
    try:
        end = find_head_end(data, max_head_size)
    except HeadTooLarge:
        first = data.find(HEAD_END)
        assert len(data) > max_head_size or first + len(HEAD_END) > max_head_size
        return None
    if end < 0:
        assert HEAD_END not in data and len(data) <= max_head_size
        return None
    assert data[end - len(HEAD_END):end] == HEAD_END
    assert data.find(HEAD_END) == end - len(HEAD_END)
    try:
        head = parse_head(data[:end], max_headers)
    except HeadError as exc:
        assert exc.status in (400, 431) and exc.reason
        return None
    check_head(head, max_headers)
    return head


# Pure properties ----------------------------------------------------------------------------


@PURE
@given(data=st.binary(max_size=600), max_head_size=st.integers(1, 700),
       max_headers=st.integers(1, 20))
@example(data=b"GET / HTTP/1.1\r\n\r\n", max_head_size=18, max_headers=1)
@example(data=b"CONNECT uuid:x?response=1 HTTP/1.1\r\n\r\n", max_head_size=700, max_headers=1)
@example(data=b"\r\n\r\n", max_head_size=4, max_headers=1)
@example(data=b"GET /\r\n\r\n", max_head_size=100, max_headers=1)
def test_any_bytes_give_a_head_or_a_head_error(data: bytes, max_head_size: int,
                                                max_headers: int) -> None:
    head = parse_all(data, max_head_size, max_headers)
    if head is not None:
        check_route(head)
        check_forwarded(head)


@PURE
@given(data=st.one_of(rough_heads(), clean_heads().map(lambda h: h[0])))
def test_realistic_heads_parse_route_and_forward(data: bytes) -> None:
    head = parse_all(data)
    if head is not None:
        check_route(head)
        check_forwarded(head)


@PURE
@given(parts=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n\r", b"x", b"GET / HTTP/1.1",
                                       b": ", b"\r\n\r\n"]), max_size=30),
       cuts=st.lists(st.integers(0, 200), max_size=8), max_head_size=st.integers(1, 150))
def test_searching_as_data_arrives_finds_the_same_end(parts: list[bytes], cuts: list[int],
                                                      max_head_size: int) -> None:
    """The relay searches only what it has not scanned yet; the result must be the one a
    search of everything so far gives, wherever the reads split the blank line."""
    data = b"".join(parts)
    bounds = sorted({min(cut, len(data)) for cut in cuts} | {len(data)})
    buffer = bytearray()
    scanned, start = 0, 0
    for bound in bounds:
        buffer += data[start:bound]
        start = bound
        try:
            whole: int | str = find_head_end(bytes(buffer), max_head_size)
        except HeadTooLarge:
            whole = "too large"
        try:
            step: int | str = find_head_end(buffer, max_head_size, scanned)
        except HeadTooLarge:
            step = "too large"
        assert step == whole, (bytes(buffer), scanned)
        if whole != -1:
            break
        scanned = len(buffer)


@PURE
@given(head=clean_heads())
def test_well_formed_heads_parse_exactly_and_limits_bite_at_the_edge(
        head: tuple[bytes, str, str, list[tuple[str, str]]]) -> None:
    raw, method, target, fields = head
    end = find_head_end(raw, len(raw))
    assert end == len(raw)
    with pytest.raises(HeadTooLarge):
        find_head_end(raw, len(raw) - 1)
    try:
        parsed = parse_head(raw, MAX_HEADERS)
    except MalformedHead:
        # llhttp refuses some well-formed-looking heads (a bad Content-Length, say): fine,
        # as long as it is a HeadError.
        return
    assert (parsed.method, parsed.target) == (method, target)
    assert parsed.headers == tuple((n.encode("latin-1"), v.encode("latin-1"))
                                   for n, v in fields)
    count = len(fields)
    if count:
        assert len(parse_head(raw, count).headers) == count
        with pytest.raises(HeadTooLarge):
            parse_head(raw, count - 1)
    check_route(parsed)
    check_forwarded(parsed)


@PURE
@given(uuid=ids, token=digits, extra=st.lists(st.tuples(st.text(TCHAR, min_size=1, max_size=8),
                                                        field_value), max_size=3))
def test_connect_with_uuid_and_response_parks(uuid: str, token: str,
                                              extra: list[tuple[str, str]]) -> None:
    lines = [f"CONNECT uuid:{uuid}?response={token} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in extra]
    head = parse_head(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), MAX_HEADERS)
    assert route(head) == Park(uuid, token)


@PURE
@given(uuid=ids, password=st.text(max_size=20), scheme=st.sampled_from(["basic", "digest"]),
       method=st.sampled_from([m for m in METHODS if m != "CONNECT"]),
       upgrade=st.booleans(), position=st.integers(0, 3))
def test_authorization_user_name_picks_the_hidden_server(
        uuid: str, password: str, scheme: str, method: str, upgrade: bool,
        position: int) -> None:
    if scheme == "basic":
        value = "Basic " + base64.b64encode(f"{uuid}:{password}".encode()).decode()
    else:
        value = (f'Digest username="{uuid}", realm="rendezvous", nonce="{"0" * 32}", '
                 f'uri="/", response="{"1" * 32}", opaque="a4f316df3e6c55a20ca82389083849ea"')
    fields = [("Host", "relay"), ("Accept", "*/*"), ("Content-Length", "0")]
    if upgrade:
        fields.append(("Upgrade", "websocket"))
    fields.insert(position, ("Authorization", value))
    lines = [f"{method} /x HTTP/1.1"] + [f"{n}: {v}" for n, v in fields]
    head = parse_head(("\r\n".join(lines) + "\r\n\r\n").encode(), MAX_HEADERS)
    assert route(head) == Pair(uuid)
    forwarded = head.forwarded()
    assert value.encode() not in forwarded
    check_forwarded(head)


@PURE
@given(uuid=ids, query=st.lists(st.tuples(st.text(ID_CHARS, min_size=1, max_size=6),
                                          st.text(ID_CHARS, max_size=6)), max_size=3))
def test_upgrade_names_the_hidden_server_in_its_query(uuid: str,
                                                      query: list[tuple[str, str]]) -> None:
    params = [f"{k}={v}" for k, v in query if k != "rendezvous"] + [f"rendezvous={uuid}"]
    head = parse_head((f"GET /ws?{'&'.join(params)} HTTP/1.1\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\n\r\n").encode(), MAX_HEADERS)
    assert route(head) == Pair(uuid)
    plain = parse_head(f"GET /ws?{'&'.join(params)} HTTP/1.1\r\n\r\n".encode(), MAX_HEADERS)
    assert route(plain) == Challenge()  # without Upgrade the query names nothing


# Bugs found by these tests, fixed; kept as regressions ----------------------------------


@pytest.mark.parametrize("raw", KNOWN_ROUTE_CRASHERS, ids=KNOWN_ROUTE_CRASHER_IDS)
def test_route_never_raises_on_these_heads(raw: bytes) -> None:
    decision = route(parse_head(raw, MAX_HEADERS))
    assert isinstance(decision, Park | Pair | Challenge | Refuse)


@pytest.mark.parametrize("raw", [b"GET /\r\nHost: x\r\n\r\n", b"CONNECT  \r\nUpgrade: a\r\n\r\n",
                                 b"GET / HTTP/0.9\r\nHost: x\r\n\r\n",
                                 b"GET / HTTP/2.0\r\nHost: x\r\n\r\n"],
                         ids=["no-version", "no-version-empty-target", "0.9", "2.0"])
def test_only_http1_request_lines_are_heads(raw: bytes) -> None:
    try:
        head = parse_head(raw, MAX_HEADERS)
    except MalformedHead:
        return
    assert head.version in ("1.0", "1.1"), head
    check_forwarded(head)


# A live relay -------------------------------------------------------------------------------

LIVE_HEAD_TIMEOUT = 0.5
LIVE_PAIR_WAIT = 0.05
LIVE_MAX_HEAD = 4096
# Close after the last answer: head timeout (re-armed after each answered request) plus a
# pairing wait plus slack for a busy machine.
CLOSE_WITHIN = LIVE_HEAD_TIMEOUT + LIVE_PAIR_WAIT + 2.0


class Live:
    def __init__(self, server: ServerThread, entry: Entry, errors: LoopErrors,
                 baseline: Snapshot) -> None:
        self.server, self.entry, self.errors, self.baseline = server, entry, errors, baseline


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    limits = GuessLimits(per_address_burst=10**6, per_id_burst=10**6)
    with running_server(tmp_path_factory.mktemp("live"), head_timeout=LIVE_HEAD_TIMEOUT,
                        pair_wait=LIVE_PAIR_WAIT, max_head_size=LIVE_MAX_HEAD, max_headers=20,
                        guesses=limits) as server, LoopErrors(server) as errors:
        entry = server.add_entry()
        assert_pairing_works(server, entry)  # warm up: first-use allocations are not leaks
        baseline = idle_snapshot(server)
        yield Live(server, entry, errors, baseline)


def _oversized(size: int) -> bytes:
    return b"GET / HTTP/1.1\r\nX-Filler: " + b"a" * size


live_payloads = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda data: data + HEAD_END),
    rough_heads(),
    clean_heads().map(lambda h: h[0]),
    st.tuples(clean_heads(), rough_heads()).map(lambda t: t[0][0] + t[1]),  # pipelined
    st.integers(LIVE_MAX_HEAD, LIVE_MAX_HEAD + 3000).map(_oversized),
)
modes = st.sampled_from(["open", "open", "fin", "rst"])


@LIVE
@given(batch=st.lists(st.tuples(live_payloads, modes), min_size=1, max_size=3))
@example(batch=[(b"", "open")])
@example(batch=[(b"GET / HTTP/1.1\r\nHost: x\r\n", "open")])
@example(batch=[(b"CONNECT uuid:x?response=123456 HTTP/1.1\r\n\r\nearly", "open")])
@example(batch=[(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", "open")])
@example(batch=[(_oversized(LIVE_MAX_HEAD), "open")])
@example(batch=[(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 20, "fin")])
@example(batch=[(raw, "open") for raw in KNOWN_ROUTE_CRASHERS])
def test_any_bytes_at_a_live_relay_get_an_error_or_a_close(
        live: Live, batch: list[tuple[bytes, str]]) -> None:
    server = live.server
    sockets: list[tuple[socket.socket, bytes, str]] = []
    try:
        for data, mode in batch:
            sock = server.connect()
            if data:
                sock.sendall(data)
            if mode == "fin":
                socket.socket.shutdown(sock, socket.SHUT_WR)  # a FIN, no TLS close_notify
            elif mode == "rst":
                reset(sock)
            sockets.append((sock, data, mode))
        started = time.monotonic()
        for sock, data, mode in sockets:
            if mode == "rst":
                continue
            remaining = CLOSE_WITHIN - (time.monotonic() - started)
            answer, closed = read_to_close(sock, max(0.0, remaining))
            assert closed, f"not closed within {CLOSE_WITHIN} s after {data[:80]!r}: {answer!r}"
            if answer:
                assert answer.startswith(b"HTTP/1.1 ") and answer[9:12].isdigit(), answer[:80]
            if mode == "open" and HEAD_END not in data:
                if b"\n\n" in data[:LIVE_MAX_HEAD] or starts_with_proxy(data):
                    # A bare-LF blank line, or a PROXY header from an address not trusted to
                    # send one: refused at once, whatever follows.
                    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
                elif len(data) > LIVE_MAX_HEAD:
                    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
                elif data:
                    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
                else:
                    assert answer == b""
    finally:
        for sock, _, _ in sockets:
            sock.close()
    wait_for_baseline(server, live.baseline)
    assert_pairing_works(server, live.entry)
    wait_for_baseline(server, live.baseline)
    live.errors.assert_none()


@pytest.mark.parametrize("raw", KNOWN_ROUTE_CRASHERS, ids=KNOWN_ROUTE_CRASHER_IDS)
def test_live_relay_answers_bad_authorization_without_an_escaping_exception(
        tmp_path: Path, raw: bytes) -> None:
    with running_server(tmp_path, head_timeout=2.0) as server, LoopErrors(server) as errors:
        with server.connect() as sock:
            sock.sendall(raw)
            answer, _ = read_to_close(sock, 3.0)
        errors.assert_none()
        assert answer.startswith(b"HTTP/1.1 4"), answer
