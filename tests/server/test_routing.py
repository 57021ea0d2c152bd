"""Every request on a visitor connection is routed by its own ``Authorization``
(docs/protocol.md §2, "Later requests on the same visitor connection"; issue 11 item 4).

Clients pool connections per origin and every ID shares the relay's, so one connection carries
requests for several IDs. A real relay with three hidden HTTP servers (A, B and V, which has a
visitor password) and one ID with none (C): real curl, requests, httpx and Chromium send requests
for several IDs on one connection; each reaches its own hidden server, none reaches another, and
no hidden server ever sees an ``Authorization`` header. A later request that names no ID gets
the relay's challenge (a Digest client's first request for a new ID has no credentials), and
the pairing goes on when the retry names the same ID.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import requests
from harness import (
    HiddenHTTPService,
    ServedRequest,
    ServerThread,
    recv_all,
    recv_exactly,
    recv_until,
    run_in_thread,
    running_server,
)
from requests.auth import HTTPBasicAuth, HTTPDigestAuth

from rendezvous.protocol.digest import VisitorSecret
from rendezvous.registry import Entry, new_secret

pytestmark = pytest.mark.timeout(60)

CURL = shutil.which("curl")
CLIENT_TIMEOUT = 15.0
PASSWORD = "visitor secret"
HEAD_END = b"\r\n\r\n"


@dataclass
class Relay:
    server: ServerThread
    hidden: dict[str, HiddenHTTPService]  # "A", "B", "V" -> its hidden server
    ids: dict[str, str]  # "A", "B", "V", "C" -> ID

    @property
    def cert(self) -> str:
        assert self.server.tls is not None
        return str(self.server.tls.cert_file)

    def url(self, path: str) -> str:
        return self.server.url() + path

    def seen(self, name: str) -> list[str]:
        """The paths hidden server ``name`` was asked for."""
        return [request.path for request in self.hidden[name].requests]

    def all_requests(self) -> list[ServedRequest]:
        return [request for service in self.hidden.values() for request in service.requests]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    with running_server(tmp_path, pair_wait=0.3, settle=0.0) as server:
        a, b = server.add_entry(), server.add_entry()
        v_id = f"guarded-{server.port}"
        v = Entry(uuid=v_id, base32=new_secret(),
                  visitor=VisitorSecret.from_password(v_id, PASSWORD))
        server.call(server.registry.add(v))
        ids = {"A": a.uuid, "B": b.uuid, "V": v.uuid, "C": "not-parked-anywhere"}
        with HiddenHTTPService(server, a) as ha, HiddenHTTPService(server, b) as hb, \
                HiddenHTTPService(server, v) as hv:
            relay = Relay(server, {"A": ha, "B": hb, "V": hv}, ids)
            yield relay
            # Whatever a test did: no hidden server ever saw a credential meant for the relay.
            for request in relay.all_requests():
                assert request.header("Authorization") is None, request


def basic(uuid: str, password: str = "x") -> str:
    return "Basic " + base64.b64encode(f"{uuid}:{password}".encode()).decode()


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response with a Content-Length body: (head, body)."""
    head = recv_until(sock, HEAD_END)
    end = head.index(HEAD_END) + len(HEAD_END)
    head, extra = head[:end], head[end:]
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, extra + recv_exactly(sock, length - len(extra))


# curl -----------------------------------------------------------------------------------


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_curl_next_across_ids_on_one_connection(relay: Relay) -> None:
    """The issue's reproduction: ``curl -u A:x URL --next -u V:secret URL --next -u B:x URL``
    reuses one connection; each request reaches its own hidden server (and C's, parked
    nowhere, gets the relay's 404 on that same connection)."""
    assert CURL is not None
    ids = relay.ids
    args = [CURL, "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT),
            "--cacert", relay.cert, "--write-out", "\n%{http_code} %{num_connects}\n"]
    transfers = [("A", "x", "/one"), ("V", PASSWORD, "/two"), ("B", "x", "/three"),
                 ("C", "x", "/four"), ("A", "x", "/five")]
    command = [CURL]
    for index, (name, password, path) in enumerate(transfers):
        if index:
            command.append("--next")
        command += [*args[1:], "-u", f"{ids[name]}:{password}", relay.url(path)]
    done = subprocess.run(command, capture_output=True, timeout=CLIENT_TIMEOUT + 5, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    lines = done.stdout.decode().strip().split("\n")
    statuses = [line for line in lines if line.count(" ") == 1 and line[:3].isdigit()]
    # One connection for all five: the first transfer connected, the others reused it.
    assert statuses == ["200 1", "200 0", "200 0", "404 0", "200 0"], done.stdout
    documents = [json.loads(line) for line in lines if line.startswith("{") and "path" in line]
    assert [document["path"] for document in documents] == ["/one", "/two", "/three", "/five"]
    assert relay.seen("A") == ["/one", "/five"]
    assert relay.seen("V") == ["/two"]
    assert relay.seen("B") == ["/three"]


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_curl_digest_keep_alive_to_one_hidden_server(relay: Relay) -> None:
    """Keep-alive to one hidden server keeps working: several URLs of one ID, one connection,
    one pairing."""
    assert CURL is not None
    command = [CURL, "--silent", "--show-error", "--fail", "--max-time", str(CLIENT_TIMEOUT),
               "--cacert", relay.cert, "--digest", "-u", f"{relay.ids['A']}:x",
               "--write-out", "\n%{num_connects}\n",
               relay.url("/k1"), relay.url("/k2"), relay.url("/k3")]
    done = subprocess.run(command, capture_output=True, timeout=CLIENT_TIMEOUT + 5, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert relay.seen("A") == ["/k1", "/k2", "/k3"]
    assert {request.pairing for request in relay.hidden["A"].requests} == {1}
    assert done.stdout.decode().split().count("0") == 2  # two reused the first connection


# requests -------------------------------------------------------------------------------


def test_requests_session_across_ids(relay: Relay) -> None:
    ids = relay.ids
    with requests.Session() as session:
        def get(path: str, auth: requests.auth.AuthBase) -> requests.Response:
            return session.get(relay.url(path), auth=auth, verify=relay.cert,
                               timeout=CLIENT_TIMEOUT)

        first = get("/r1", HTTPBasicAuth(ids["A"], "x"))
        second = get("/r2", HTTPDigestAuth(ids["B"], "x"))  # first without credentials
        third = get("/r3", HTTPDigestAuth(ids["V"], PASSWORD))
        fourth = get("/r4", HTTPBasicAuth(ids["C"], "x"))
        fifth = get("/r5", HTTPBasicAuth(ids["V"], "wrong"))
        sixth = get("/r6", HTTPBasicAuth(ids["A"], "x"))
        pools = session.get_adapter(relay.url("/")).poolmanager.pools
        (pool,) = [pools[key] for key in pools.keys()]  # noqa: SIM118 (it cannot iterate)
        assert pool.num_connections == 1  # every request went on one connection
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 200]
    assert [first.json()["path"], second.json()["path"], third.json()["path"]] == \
        ["/r1", "/r2", "/r3"]
    assert fourth.status_code == 404 and fourth.json()["error"]["diagnostic"] == \
        "UUID not registered"
    assert fifth.status_code == 401  # the relay's visitor check, on the same connection
    assert sixth.status_code == 200 and sixth.json()["path"] == "/r6"
    assert relay.seen("A") == ["/r1", "/r6"]
    assert relay.seen("B") == ["/r2"]
    assert relay.seen("V") == ["/r3"]


def test_requests_session_keep_alive_with_digest(relay: Relay) -> None:
    """requests' Digest sends its credentials on every request after the first challenge:
    all of them go to the one pairing."""
    with requests.Session() as session:
        session.auth = HTTPDigestAuth(relay.ids["A"], "x")
        paths = [f"/d{n}" for n in range(4)]
        for path in paths:
            response = session.get(relay.url(path), verify=relay.cert, timeout=CLIENT_TIMEOUT)
            assert response.status_code == 200 and response.json()["path"] == path
    assert relay.seen("A") == paths
    assert {request.pairing for request in relay.hidden["A"].requests} == {1}


# httpx ----------------------------------------------------------------------------------


def test_httpx_client_across_ids_with_bodies(relay: Relay) -> None:
    """POST bodies, by Content-Length and chunked, reach their own hidden server whole."""
    ids = relay.ids
    fixed = random.Random(1).randbytes(3 << 20)
    chunks = [random.Random(n).randbytes(70_000 + n) for n in range(12)]
    streamed = b"".join(chunks)
    context = relay.server.client_context()
    with httpx.Client(verify=context, timeout=CLIENT_TIMEOUT) as client:
        one = client.post(relay.url("/up1"), content=fixed, auth=httpx.BasicAuth(ids["A"], "x"))
        two = client.post(relay.url("/up2"), content=iter(chunks),
                          auth=httpx.BasicAuth(ids["B"], "x"))
        three = client.get(relay.url("/g3"), auth=httpx.DigestAuth(ids["V"], PASSWORD))
        four = client.post(relay.url("/up4"), content=iter(chunks),
                           auth=httpx.BasicAuth(ids["A"], "x"))
        five = client.get(relay.url("/g5"))  # no credentials: the relay's challenge
        six = client.get(relay.url("/g6"), auth=httpx.DigestAuth(ids["A"], "x"))
    assert one.json() == {"length": len(fixed), "sha256": hashlib.sha256(fixed).hexdigest()}
    expected = {"length": len(streamed), "sha256": hashlib.sha256(streamed).hexdigest()}
    assert two.json() == expected and four.json() == expected
    assert three.status_code == 200 and three.json()["path"] == "/g3"
    assert five.status_code == 401 and "Digest" in five.headers["WWW-Authenticate"]
    assert six.status_code == 200 and six.json()["path"] == "/g6"
    assert relay.seen("A") == ["/up1", "/up4", "/g6"]
    assert relay.seen("B") == ["/up2"]
    assert relay.seen("V") == ["/g3"]
    (chunked,) = [r for r in relay.hidden["B"].requests if r.path == "/up2"]
    assert chunked.header("Transfer-Encoding") == "chunked"


# Chromium -------------------------------------------------------------------------------


def test_chromium_fetches_two_ids_in_one_context(relay: Relay) -> None:
    from browser_support import chromium  # (playwright only for this test)

    ids = relay.ids
    with chromium() as browser:
        context = browser.new_context(ignore_https_errors=True, http_credentials={
            "username": ids["A"], "password": "x"})
        page = context.new_page()
        page.goto(relay.url("/page"))  # A's page, after the relay's Digest challenge
        assert json.loads(page.inner_text("body"))["path"] == "/page"
        results = page.evaluate("""async ([b, v]) => {
            const get = async (path, auth) => {
                const r = await fetch(path, auth ? {headers: {Authorization: auth}} : {});
                return [r.status, r.status === 200 ? (await r.json()).path : null];
            };
            const out = [];
            for (let round = 0; round < 2; round++) {
                out.push(await get(`/b${round}`, b));
                out.push(await get(`/v${round}`, v));
                out.push(await get(`/a${round}`, null));
            }
            return out;
        }""", [basic(ids["B"]), basic(ids["V"], PASSWORD)])
    assert results == [[200, "/b0"], [200, "/v0"], [200, "/a0"],
                       [200, "/b1"], [200, "/v1"], [200, "/a1"]]
    assert relay.seen("B") == ["/b0", "/b1"]
    assert relay.seen("V") == ["/v0", "/v1"]
    assert [path for path in relay.seen("A") if path != "/favicon.ico"] == \
        ["/page", "/a0", "/a1"]


# Raw sockets: pipelining, upgrades, refusals ---------------------------------------------


def test_pipelined_requests_for_two_ids_wait_for_the_first_answer(relay: Relay) -> None:
    """Four requests in one write: A's; B's, which must not reach A, and must not be answered
    before A's answer is through; one with no credentials, which the relay challenges after
    B's answer; then B's again, on the same pairing."""
    ids = relay.ids
    body = b"0123456789" * 1000
    with relay.server.connect() as sock:
        sock.sendall(
            f"POST /p1 HTTP/1.1\r\nHost: r\r\nAuthorization: {basic(ids['A'])}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            + f"GET /p2 HTTP/1.1\r\nHost: r\r\nAuthorization: {basic(ids['B'])}\r\n\r\n".encode()
            + b"POST /p3 HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"5\r\nGET /\r\n0\r\n\r\n"  # a body that looks like a head: dropped with it
            + f"GET /p4 HTTP/1.1\r\nHost: r\r\nAuthorization: {basic(ids['B'])}\r\n\r\n"
            .encode())
        answers = [read_response(sock) for _ in range(4)]
    assert answers[2][0].startswith(b"HTTP/1.1 401 ")
    assert [json.loads(body).get("path") for _, body in answers[:2]] == [None, "/p2"]
    assert json.loads(answers[3][1])["path"] == "/p4"
    assert json.loads(answers[0][1]) == {"length": len(body),
                                         "sha256": hashlib.sha256(body).hexdigest()}
    assert relay.seen("A") == ["/p1"]
    assert relay.seen("B") == ["/p2", "/p4"]
    assert {request.pairing for request in relay.hidden["B"].requests} == {1}


def test_after_a_101_the_stream_is_raw(relay: Relay, tmp_path: Path) -> None:
    """After a 101 even bytes that look like a request for another ID are the WebSocket's."""
    ids = relay.ids
    server = relay.server
    entry = server.add_entry()
    hidden = server.park(entry)
    with server.connect() as mobile:
        mobile.sendall(f"GET /ws HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n"
                       "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode())
        recv_until(hidden, HEAD_END)
        switched = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        hidden.sendall(switched)
        assert recv_exactly(mobile, len(switched)) == switched
        lookalike = f"GET /x HTTP/1.1\r\nAuthorization: {basic(ids['B'])}\r\n\r\n".encode()
        mobile.sendall(lookalike)
        assert recv_exactly(hidden, len(lookalike)) == lookalike  # unchanged, to the same one
        hidden.sendall(b"raw answer")
        assert recv_exactly(mobile, 10) == b"raw answer"
    hidden.close()
    assert relay.seen("B") == []


def test_a_refused_upgrade_is_followed_by_a_routed_request(relay: Relay) -> None:
    ids = relay.ids
    server = relay.server
    entry = server.add_entry()
    hidden = server.park(entry)
    with server.connect() as mobile:
        mobile.sendall(f"GET /ws HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n"
                       "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode()
                       + f"GET /after HTTP/1.1\r\nAuthorization: {basic(ids['B'])}\r\n\r\n"
                       .encode())
        head = recv_until(hidden, HEAD_END)
        assert head.endswith(HEAD_END) and b"/after" not in head  # held until the answer
        hidden.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno")
        refused, _ = read_response(mobile)
        assert refused.startswith(b"HTTP/1.1 400")
        _, body = read_response(mobile)
        assert json.loads(body)["path"] == "/after"
        assert recv_all(hidden) == b""  # closed without seeing B's request
    hidden.close()
    assert relay.seen("B") == ["/after"]


def test_a_visitor_password_is_checked_once_per_pairing(relay: Relay) -> None:
    """At the pairing's start; later requests naming the same ID go on (the client has proved
    itself on this connection); one naming no ID gets the relay's challenge."""
    ids = relay.ids
    with relay.server.connect() as sock:
        sock.sendall(f"GET /v1 HTTP/1.1\r\nAuthorization: {basic(ids['V'], 'guess')}\r\n\r\n"
                     .encode())
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 401")  # the relay's visitor check: not paired
        sock.sendall(f"GET /v2 HTTP/1.1\r\nAuthorization: {basic(ids['V'], PASSWORD)}\r\n\r\n"
                     .encode())
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["path"] == "/v2"
        # (No password at all now: only the pairing's first request is checked.)
        sock.sendall(f"GET /v3 HTTP/1.1\r\nAuthorization: {basic(ids['V'], '')}\r\n\r\n"
                     .encode())
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["path"] == "/v3"
        sock.sendall(b"GET /v4 HTTP/1.1\r\n\r\n")
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 401") and b"WWW-Authenticate: Digest" in head
    assert relay.seen("V") == ["/v2", "/v3"]
    assert {request.pairing for request in relay.hidden["V"].requests} == {1}


def test_a_malformed_later_head_is_refused_after_the_answer(relay: Relay) -> None:
    ids = relay.ids
    with relay.server.connect() as sock:
        sock.sendall(f"GET /m1 HTTP/1.1\r\nAuthorization: {basic(ids['A'])}\r\n\r\n".encode()
                     + b"NOT HTTP AT ALL\r\n\r\n")
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["path"] == "/m1"
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 400")
        assert recv_all(sock) == b""  # and closed
    assert relay.seen("A") == ["/m1"]


# The idle timeout -----------------------------------------------------------------------


def test_an_idle_pairing_is_closed_and_a_busy_one_is_not(tmp_path: Path) -> None:
    with running_server(tmp_path, pair_wait=0.3, settle=0.0, pair_idle_timeout=0.6) as server:
        entry = server.add_entry()
        busy_hidden = server.park(entry)
        request = f"GET / HTTP/1.1\r\nAuthorization: {basic(entry.uuid)}\r\n\r\n".encode()
        with server.connect() as busy:
            busy.sendall(request)
            recv_until(busy_hidden, HEAD_END)
            idle_hidden = server.park(entry)
            with server.connect() as idle:
                idle.sendall(request)
                recv_until(idle_hidden, HEAD_END)
                started = time.monotonic()

                def trickle() -> None:  # a chunk every 0.15 s for 1.5 s
                    busy_hidden.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for _ in range(10):
                        busy_hidden.sendall(b"1\r\nx\r\n")
                        time.sleep(0.15)
                    busy_hidden.sendall(b"0\r\n\r\n")

                thread, outcome = run_in_thread(trickle)
                assert recv_all(idle) == b""  # the idle one is cut meanwhile
                idle_for = time.monotonic() - started
                data = recv_until(busy, b"0\r\n\r\n")
                thread.join(5)
                assert outcome == [None]
                assert data.count(b"1\r\nx\r\n") == 10  # the busy one lived through it all
        busy_hidden.close()
        idle_hidden.close()
    assert 0.6 <= idle_for < 1.2, idle_for


def test_thousands_of_pipelined_unnamed_requests_are_each_challenged(relay: Relay) -> None:
    """Answered in a loop, not by recursion, and only as fast as the client reads them; the
    pairing is still there afterwards."""
    ids = relay.ids
    count = 3000
    with relay.server.connect() as sock:
        sock.sendall(f"GET /f1 HTTP/1.1\r\nAuthorization: {basic(ids['A'])}\r\n\r\n".encode())
        head, body = read_response(sock)
        assert json.loads(body)["path"] == "/f1"
        flood = b"GET / HTTP/1.1\r\nHost: r\r\n\r\n" * count
        sender, outcome = run_in_thread(lambda: sock.sendall(
            flood + f"GET /f2 HTTP/1.1\r\nAuthorization: {basic(ids['A'])}\r\n\r\n".encode()))
        time.sleep(0.5)  # the client reads nothing for a while: the relay must wait for it
        for _ in range(count):
            head, _ = read_response(sock)
            assert head.startswith(b"HTTP/1.1 401 ")
        head, body = read_response(sock)
        assert json.loads(body)["path"] == "/f2"
        sender.join(10)
        assert outcome == [None]
    assert relay.seen("A") == ["/f1", "/f2"]
    assert {request.pairing for request in relay.hidden["A"].requests} == {1}
