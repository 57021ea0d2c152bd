"""Hostile peers, round two (issue 11): bare-socket floods against the connection caps, the TLS
handshake's own deadline, visitor-password guessing, shared-address lockouts, forged log lines.

Attackers and legitimate peers are told apart by their source address (any 127.x.y.z binds).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from harness import PARKED, ServerThread, recv_all, recv_exactly, recv_until, running_server

from rendezvous import logs
from rendezvous.config import AdminConfig, GuessLimits
from rendezvous.protocol.digest import NONCE_COUNT_WINDOW, NonceBook, VisitorSecret
from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry, new_secret
from rendezvous.server.ratelimit import GuessLimiter

ATTACKER = "127.0.0.9"
HIDDEN = "127.0.0.2"


class Records(logging.Handler):
    """Every record the package logs while installed, kept for the test to read."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def fields(self, name: str) -> list[dict[str, object]]:
        return [getattr(r, "event_fields", {}) for r in self.records if r.getMessage() == name]

    def rejected(self, reason: str) -> list[dict[str, object]]:
        return [f for f in self.fields("rejected") if f.get("reason") == reason]


@contextlib.contextmanager
def recorded() -> Iterator[Records]:
    handler = Records()
    level = logs.log.level
    logs.log.addHandler(handler)
    logs.log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logs.log.removeHandler(handler)
        logs.log.setLevel(level)


def park_from(server: ServerThread, entry: Entry, source: str) -> socket.socket:
    """A real hidden server's park from ``source``: TLS, CONNECT with the current code, 200."""
    sock = server.connect(source=source)
    token = current_token(entry.base32, entry.step, entry.digits)
    sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
    assert recv_exactly(sock, len(PARKED)) == PARKED
    return sock


def bare_connects(server: ServerThread, count: int, source: str = ATTACKER
                  ) -> list[socket.socket]:
    """``count`` plain TCP connections that send nothing (not even a ClientHello)."""
    socks = []
    for _ in range(count):
        socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5.0,
                                              source_address=(source, 0)))
    return socks


def closed_by_server(socks: list[socket.socket], expected: int, within: float
                     ) -> list[socket.socket]:
    """The sockets the server closed (EOF or reset): waits up to ``within`` seconds for
    ``expected`` of them, then 0.2 s more to catch any beyond."""
    closed: list[socket.socket] = []
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as selector:  # (select() stops at descriptor 1024)
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < len(socks):
            now = time.monotonic()
            if len(closed) >= expected:
                deadline = min(deadline, now + 0.2)
            if now >= deadline:
                break
            for key, _ in selector.select(deadline - now):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                selector.unregister(sock)
                try:
                    data = sock.recv(1024)
                except ConnectionResetError:
                    data = b""
                assert data == b"", data  # no TLS work, no HTTP answer: just the close
                closed.append(sock)
    return closed


def wait_open(server: ServerThread, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.open_connections() != count:
        assert time.monotonic() < deadline, f"{server.open_connections()} open, not {count}"
        time.sleep(0.01)


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def rejections(server: ServerThread, reason: str) -> int:
    hub = server.server.hub
    assert hub is not None
    return int(server.sync(lambda: hub.stats.rejections[reason]))


# 1. Sockets in their TLS handshake count against the caps from accept --------------------

def test_bare_connects_over_the_per_address_cap_are_closed_at_once(tmp_path: Path) -> None:
    with recorded() as log, running_server(tmp_path, max_per_address=512,
                                           admin=AdminConfig(port=0)) as server:
        entry = server.add_entry()
        socks = bare_connects(server, 600)
        try:
            started = time.monotonic()
            assert len(closed_by_server(socks, 88, within=3.0)) == 88
            assert time.monotonic() - started < 3.0
            wait_open(server, 512)
            # The gauge on /metrics counts the 512 sockets still in their handshake.
            metrics = requests.get(server.admin_url() + "/metrics", timeout=10).text
            assert "rendezvous_open_connections 512.0" in metrics
            assert rejections(server, "too many connections from this address") == 88
            # A real hidden server behind another address still parks.
            hidden = park_from(server, entry, HIDDEN)
            assert server.parked(entry.uuid) == 1
            hidden.close()
        finally:
            close_all(socks)
        # 88 rejections from one address: one line at once, the rest a count (at the latest
        # when the server stops).
        assert len(log.rejected("too many connections from this address")) == 1
    lines = log.rejected("too many connections from this address")
    assert [line.get("repeats") for line in lines] == [None, 87]


def test_bare_connects_over_max_connections_are_closed_at_once(tmp_path: Path) -> None:
    with running_server(tmp_path, max_connections=300) as server:
        entry = server.add_entry()
        socks = bare_connects(server, 400)
        try:
            assert len(closed_by_server(socks, 100, within=3.0)) == 100
            wait_open(server, 300)
            assert rejections(server, "too many connections") == 100
        finally:
            close_all(socks)
        wait_open(server, 0)
        hidden = park_from(server, entry, HIDDEN)  # room again once the flood is gone
        hidden.close()


def test_over_cap_plain_connections_still_get_503(tmp_path: Path) -> None:
    with running_server(tmp_path, tls=False, max_per_address=2) as server:
        socks = bare_connects(server, 2)
        try:
            wait_open(server, 2)
            with socket.create_connection(("127.0.0.1", server.port), timeout=5.0,
                                          source_address=(ATTACKER, 0)) as extra:
                assert extra.recv(1024).startswith(b"HTTP/1.1 503 ")
        finally:
            close_all(socks)


def test_a_handshake_has_its_own_shorter_deadline(tmp_path: Path) -> None:
    with recorded() as log, running_server(tmp_path, handshake_timeout=0.3,
                                           head_timeout=5.0) as server:
        socks = bare_connects(server, 20)
        try:
            started = time.monotonic()
            assert len(closed_by_server(socks, 20, within=3.0)) == 20
            assert 0.25 <= time.monotonic() - started < 2.5
            assert rejections(server, "handshake timeout") == 20
            assert len(log.rejected("handshake timeout")) == 1  # the rest are counted
        finally:
            close_all(socks)
        # Still well within its head timeout, a real client's handshake and head go through.
        with server.connect(source=HIDDEN) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 401 ")
    assert [line.get("repeats") for line in log.rejected("handshake timeout")] == [None, 19]


def test_the_head_timeout_bounds_the_handshake_too(tmp_path: Path) -> None:
    with running_server(tmp_path, handshake_timeout=10.0, head_timeout=0.4) as server:
        socks = bare_connects(server, 3)
        try:
            started = time.monotonic()
            assert len(closed_by_server(socks, 3, within=3.0)) == 3
            assert time.monotonic() - started < 2.0
        finally:
            close_all(socks)
        wait_open(server, 0)


def test_a_client_that_leaves_mid_handshake_is_forgotten(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        socks = bare_connects(server, 5)
        wait_open(server, 5)
        for sock in socks:
            sock.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello, then gone
            sock.close()
        wait_open(server, 0)
        assert server.sync(lambda: server.server.hub.from_address("127.0.0.9")) == 0  # type: ignore[union-attr]


# 2. Visitor passwords cannot be guessed at line speed ------------------------------------

VISITOR_PASSWORD = "open sesame"


def guarded_entry(server: ServerThread) -> Entry:
    uuid = f"guarded-{time.monotonic_ns()}"
    entry = Entry(uuid=uuid, base32=new_secret(),
                  visitor=VisitorSecret.from_password(uuid, VISITOR_PASSWORD))
    server.call(server.registry.add(entry))
    return entry


def basic_request(uuid: str, password: str, path: str = "/") -> bytes:
    credentials = base64.b64encode(f"{uuid}:{password}".encode()).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Basic {credentials}\r\n\r\n"
            .encode())


def statuses(answer: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"^HTTP/1\.1 (\d{3})", answer, re.MULTILINE)]


def test_pipelined_visitor_guesses_get_429s_and_closes(tmp_path: Path) -> None:
    limits = GuessLimits(per_address_burst=4, per_address_interval=60.0, per_id_burst=100)
    with recorded() as log, running_server(tmp_path, visitor_guesses=limits,
                                           visitor_failures_per_connection=3,
                                           pair_wait=0.3) as server:
        entry = guarded_entry(server)
        hidden = park_from(server, entry, HIDDEN)
        guesses = b"".join(basic_request(entry.uuid, f"guess {n}") for n in range(10))
        # One connection pipelining ten guesses: three 401s, then it is closed.
        with server.connect(source=ATTACKER) as sock:
            sock.sendall(guesses)
            answer = recv_all(sock)
        assert statuses(answer) == [401, 401, 401]
        assert answer.count(b"Connection: close\r\n") == 1
        # The next: one guess left in the address's bucket, then 429 with Retry-After, closed.
        with server.connect(source=ATTACKER) as sock:
            sock.sendall(guesses)
            answer = recv_all(sock)
        assert statuses(answer) == [401, 429]
        retry_after = int(re.search(rb"Retry-After: (\d+)\r\n", answer).group(1))  # type: ignore[union-attr]
        assert 1 <= retry_after <= 60
        # Now not even the right password is checked from there: no oracle.
        with server.connect(source=ATTACKER) as sock:
            sock.sendall(basic_request(entry.uuid, VISITOR_PASSWORD))
            assert statuses(recv_all(sock)) == [429]
        assert server.parked(entry.uuid) == 1  # no guess reached the hidden server
        # A real visitor from another address gets in.
        with server.connect(source="127.0.0.3") as sock:
            sock.sendall(basic_request(entry.uuid, VISITOR_PASSWORD, "/real"))
            assert recv_until(hidden, b"\r\n\r\n").startswith(b"GET /real HTTP/1.1\r\n")
        hidden.close()
        # Four wrong passwords from one address: one line, the rest counted.
        assert len(log.rejected("visitor not authorized")) == 1
        assert rejections(server, "visitor not authorized") == 4
        assert rejections(server, "too many visitor guesses") == 2


def test_guesses_spread_over_addresses_meet_the_id_bucket(tmp_path: Path) -> None:
    limits = GuessLimits(per_address_burst=100, per_id_burst=3, per_id_interval=60.0)
    with running_server(tmp_path, visitor_guesses=limits, pair_wait=0.3) as server:
        entry = guarded_entry(server)
        hidden = park_from(server, entry, HIDDEN)
        with server.connect(source="127.0.0.3") as sock:  # a visitor who got in before
            sock.sendall(basic_request(entry.uuid, VISITOR_PASSWORD, "/first"))
            assert recv_until(hidden, b"\r\n\r\n").startswith(b"GET /first ")
        hidden.close()
        hidden = park_from(server, entry, HIDDEN)
        for n in range(3):
            with server.connect(source=f"127.0.1.{n + 1}") as sock:
                sock.sendall(basic_request(entry.uuid, "guess"))
                assert statuses(recv_until(sock, b"\r\n\r\n")) == [401]
        with server.connect(source="127.0.1.9") as sock:  # a fourth address: the ID is locked
            sock.sendall(basic_request(entry.uuid, "guess"))
            assert statuses(recv_all(sock)) == [429]
        with server.connect(source="127.0.0.3") as sock:  # good history: its own allowance
            sock.sendall(basic_request(entry.uuid, VISITOR_PASSWORD, "/again"))
            assert recv_until(hidden, b"\r\n\r\n").startswith(b"GET /again ")
        hidden.close()


def test_online_status_does_not_leak_to_a_wrong_password(tmp_path: Path) -> None:
    with running_server(tmp_path, pair_wait=1.0) as server:
        entry = guarded_entry(server)
        # Nothing parked: a wrong password still gets its 401 at once (as when parked) ...
        with server.connect() as sock:
            started = time.monotonic()
            sock.sendall(basic_request(entry.uuid, "guess"))
            assert statuses(recv_until(sock, b"\r\n\r\n")) == [401]
            assert time.monotonic() - started < 0.5
        hidden = server.park(entry)
        with server.connect() as sock:
            sock.sendall(basic_request(entry.uuid, "guess"))
            assert statuses(recv_until(sock, b"\r\n\r\n")) == [401]
        hidden.close()
        server.wait_parked(entry.uuid, 0)
        # ... and only the right password learns, after pair_wait, that nothing is parked.
        with server.connect() as sock:
            started = time.monotonic()
            sock.sendall(basic_request(entry.uuid, VISITOR_PASSWORD))
            assert statuses(recv_until(sock, b"\r\n\r\n")) == [404]
            assert time.monotonic() - started >= 0.9


def test_without_pair_wait_a_wrong_password_still_gets_401(tmp_path: Path) -> None:
    with running_server(tmp_path, pair_wait=0.0) as server:
        entry = guarded_entry(server)
        with server.connect() as sock:
            sock.sendall(basic_request(entry.uuid, "guess"))
            assert statuses(recv_until(sock, b"\r\n\r\n")) == [401]
            sock.sendall(basic_request(entry.uuid, VISITOR_PASSWORD))
            assert statuses(recv_until(sock, b"\r\n\r\n")) == [404]
            sock.sendall(basic_request("no-such-id", "x"))
            assert statuses(recv_until(sock, b"\r\n\r\n")) == [404]


# 5. A hidden server behind a shared address is not locked out -----------------------------

def connect_from(server: ServerThread, uuid: str, token: str, source: str) -> bytes:
    with server.connect(source=source) as sock:
        sock.sendall(f"CONNECT uuid:{uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        return recv_until(sock, b"\r\n\r\n")


def test_made_up_ids_from_a_shared_address_do_not_lock_out_its_hidden_server(
        tmp_path: Path) -> None:
    shared = "127.0.0.5"
    with running_server(tmp_path) as server:  # the default limits: 20 failures per address
        entry = server.add_entry()
        park_from(server, entry, shared).close()  # it parked from there before
        for n in range(20):  # someone else behind the same address
            assert connect_from(server, f"made-up-{n}", "123456", shared).startswith(
                b"HTTP/1.1 401\r\n")
        assert connect_from(server, "made-up-20", "123456", shared).startswith(
            b"HTTP/1.1 429\r\n")  # the address is out of tries ...
        hidden = park_from(server, entry, shared)  # ... but not the pair with good history
        hidden.close()


def test_an_attacker_draining_an_id_cannot_keep_a_new_hidden_server_out(
        tmp_path: Path) -> None:
    interval = 0.5
    limits = GuessLimits(per_address_burst=10_000, per_id_burst=2, per_id_interval=interval)
    with running_server(tmp_path, guesses=limits) as server:
        entry = server.add_entry()
        wrong = f"{(int(current_token(entry.base32, entry.step, entry.digits)) + 1) % 10**6:06d}"
        for _ in range(2):
            connect_from(server, entry.uuid, wrong, ATTACKER)
        stop = threading.Event()
        tries = [0]

        def attack() -> None:  # spends each token as soon as it refills, for ever
            deadline = time.monotonic() + 10
            while not stop.is_set() and time.monotonic() < deadline:
                connect_from(server, entry.uuid, wrong, ATTACKER)
                tries[0] += 1

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        try:
            started = time.monotonic()
            token = current_token(entry.base32, entry.step, entry.digits)
            while True:  # a hidden server from a new address, retrying every 0.1 s
                answer = connect_from(server, entry.uuid, token, HIDDEN)
                if answer == PARKED:
                    break
                assert answer.startswith(b"HTTP/1.1 429\r\n"), answer
                assert time.monotonic() - started < 4 * interval, "locked out"
                time.sleep(0.1)
        finally:
            stop.set()
            attacker.join(15)
        assert tries[0] > 5  # the attacker kept trying meanwhile


def test_limiter_waiting_line_is_first_refused_first_served() -> None:
    limiter = GuessLimiter(GuessLimits(per_address_burst=100, per_id_burst=1,
                                       per_id_interval=10.0))
    limiter.failed("attacker", "id", 0.0)
    assert limiter.retry_after("hidden", "id", 1.0) == 9.0  # queued first
    assert limiter.retry_after("attacker", "id", 10.0) > 0  # the refilled token is not its
    assert limiter.retry_after("hidden", "id", 10.5) == 0
    limiter.succeeded("hidden", "id", 10.5)  # (a success spends nothing)
    assert limiter.retry_after("attacker", "id", 11.0) == 0  # its turn now
    limiter.failed("attacker", "id", 11.0)
    # One who stops asking leaves the line: it does not hold the ID's tokens for ever.
    assert limiter.retry_after("gone", "id", 12.0) > 0
    assert limiter.retry_after("hidden-2", "id", 13.0) > 0
    assert limiter.retry_after("hidden-2", "id", 40.0) == 0


# 7. Log lines cannot be forged ------------------------------------------------------------

FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def text_lines(log: Records, name: str) -> list[str]:
    formatter = logs.TextFormatter()
    return [formatter.format(r) for r in log.records if r.getMessage() == name]


def test_a_user_name_with_a_line_break_cannot_start_a_log_line(tmp_path: Path) -> None:
    forged = "nobody\r\n2026-12-01T00.00.00Z paired id=victim mobile=1.2.3.4"
    with recorded() as log, running_server(tmp_path, pair_wait=0.05) as server, \
            server.connect() as sock:
        sock.sendall(basic_request(forged, "x"))
        assert statuses(recv_until(sock, b"\r\n\r\n")) == [404]
    [line] = text_lines(log, "rejected")
    assert "\n" not in line and "\r" not in line
    assert 'id="nobody\\r\\n2026-12-01T00.00.00Z paired id=victim mobile=1.2.3.4"' in line
    assert not text_lines(log, "paired")


def test_a_quote_in_a_digest_user_name_cannot_add_fields(tmp_path: Path) -> None:
    with recorded() as log, running_server(tmp_path, pair_wait=0.05) as server, \
            server.connect() as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: relay\r\nAuthorization: Digest '
                     b'username="x\\" status=200 id=\\"V", realm="rendezvous", '
                     b'nonce="00", uri="/", response="00"\r\n\r\n')
        assert statuses(recv_until(sock, b"\r\n\r\n")) == [404]
    [line] = text_lines(log, "rejected")
    fields = FIELD.findall(line)
    assert [name for name, _ in fields].count("id") == 1
    assert dict(fields)["status"] == "404"
    assert dict(fields)["id"] == '"x\\" status=200 id=\\"V"'


def test_every_control_character_is_escaped() -> None:
    record = logging.LogRecord("rendezvous", logging.INFO, __file__, 0, "rejected", None, None)
    record.event_fields = {"a": "tab\there", "b": "nul\x00", "c": "bell\x07\u2028", "d": "",
                           "e": "back\\slash", "f": "plain"}
    line = logs.TextFormatter().format(record)
    assert line.endswith('a="tab\\there" b="nul\\x00" c="bell\\x07\\u2028" d="" '
                         'e="back\\\\slash" f=plain')


# Also noticed: nonce counts, TLS 1.2 suites ----------------------------------------------

def test_nonce_counts_may_arrive_out_of_order_but_never_twice() -> None:
    book = NonceBook(b"k" * 32)
    nonce = book.issue(now=1000.0)
    for count in (1, 3, 2, 4):  # concurrent requests on one nonce race each other
        assert book.check(nonce, f"{count:08x}", now=1001.0) == "ok"
    for count in (1, 2, 3, 4, 0):
        assert book.check(nonce, f"{count:08x}", now=1001.0) == "invalid"
    highest = 5 + NONCE_COUNT_WINDOW
    assert book.check(nonce, f"{highest:08x}", now=1001.0) == "ok"
    assert book.check(nonce, f"{5:08x}", now=1001.0) == "ok"  # the window's oldest, unseen
    assert book.check(nonce, f"{5:08x}", now=1001.0) == "invalid"
    assert book.check(nonce, f"{highest - 1:08x}", now=1001.0) == "ok"
    assert book.check(nonce, f"{highest - 1:08x}", now=1001.0) == "invalid"
    assert book.check(nonce, f"{4:08x}", now=1001.0) == "invalid"  # too old to tell


def test_tls12_offers_no_cbc_suites(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        cbc = server.client_context()
        cbc.maximum_version = ssl.TLSVersion.TLSv1_2
        cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA256:"
                        "ECDHE-RSA-AES256-SHA384:ECDHE-ECDSA-AES256-SHA384")
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5.0)
        with pytest.raises(ssl.SSLError):
            cbc.wrap_socket(raw, server_hostname="127.0.0.1")
        raw.close()
        tls12 = server.client_context()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5.0)
        with tls12.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            name, version, _ = sock.cipher()  # type: ignore[misc]
            assert version == "TLSv1.2" and ("GCM" in name or "CHACHA20" in name), name


def test_every_new_limit_has_a_serve_flag() -> None:
    from rendezvous.cli import build_parser
    from rendezvous.cli.serve import _admin_config, _limits

    args = build_parser().parse_args([
        "serve", "--handshake-timeout", "3", "--visitor-failures-per-address", "7",
        "--visitor-failure-interval-per-address", "8", "--visitor-failures-per-id", "9",
        "--visitor-failure-interval-per-id", "11", "--visitor-failures-per-connection", "2",
        "--admin", "--admin-password-failures", "4", "--admin-password-failure-interval", "30",
    ])
    limits = _limits(args)
    assert limits.handshake_timeout == 3.0
    assert limits.visitor_guesses == GuessLimits(per_address_burst=7, per_address_interval=8.0,
                                                 per_id_burst=9, per_id_interval=11.0)
    assert limits.visitor_failures_per_connection == 2
    admin = _admin_config(args)
    assert admin is not None
    assert (admin.password_failures, admin.password_failure_interval) == (4, 30.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--handshake-timeout", "0"])
