"""The mobile client: ``rendezvous open`` (a local tunnel), ``rendezvous get`` and the httpx
helpers, against a real relay (TLS on 127.0.0.1) and a hidden HTTP server parked at it.

The commands run as real processes (``python -m rendezvous``); local clients are stock ones
(plain httpx with no credentials, curl, raw sockets) pointed at the tunnel's local port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import requests
from harness import HiddenHTTPService, ServedRequest, ServerThread, recv_all, running_server
from requests.auth import HTTPDigestAuth
from support import free_port, stop_process, wait_for_text

from rendezvous.agent.mobile import async_client, client, digest_authorization
from rendezvous.protocol.responses import error_body
from rendezvous.registry import Entry

pytestmark = pytest.mark.timeout(60)

CURL = shutil.which("curl")
CLIENT_TIMEOUT = 15.0
# A cold interpreter start on a loaded 2-core machine, httpx included.
START_TIMEOUT = 20.0
RUN_TIMEOUT = 30.0
NOT_REGISTERED = error_body("UUID not registered")


@dataclass
class Relay:
    server: ServerThread
    entry: Entry
    hidden: HiddenHTTPService
    ca: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def seen_since(self, start: int) -> list[ServedRequest]:
        """The requests the hidden server answered after the first ``start``."""
        return self.hidden.requests[start:]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    folder = tmp_path_factory.mktemp("relay")
    # A short pair_wait: the unknown-ID cases wait that long for their 404.
    with running_server(folder, pair_wait=0.5) as server:
        entry = server.add_entry()
        assert server.tls is not None
        with HiddenHTTPService(server, entry, parked=2) as hidden:
            yield Relay(server, entry, hidden, server.tls.cert_file)


def rendezvous(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m rendezvous ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "rendezvous", *args], input=stdin,
                          capture_output=True, timeout=RUN_TIMEOUT, check=False)


def assert_no_authorization(requests_seen: list[ServedRequest]) -> None:
    assert requests_seen, "the hidden server saw no request"
    for request in requests_seen:
        assert request.header("Authorization") is None, request


# rendezvous open, as a process -----------------------------------------------------------


@dataclass
class Tunnel:
    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT/
    banner: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def open_tunnel(tmp: Path, uuid: str, *args: str) -> Iterator[Tunnel]:
    """``rendezvous open UUID ARGS --listen 127.0.0.1:0``; on exit SIGINT, which must end it
    with status 0."""
    log = tmp / f"open-{uuid}-{len(list(tmp.iterdir()))}.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rendezvous", "open", uuid, "--listen", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    try:
        readable, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        banner = proc.stdout.readline().decode() if readable else ""
        assert banner.startswith("open http://127.0.0.1:"), (banner, log.read_text())
        url = banner.split()[1]
        yield Tunnel(proc, url, banner.strip(), log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(RUN_TIMEOUT) == 0, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        stop_process(proc)
        proc.stdout.close()


@pytest.fixture(scope="module", params=["basic", "digest"])
def tunnel(request: pytest.FixtureRequest, relay: Relay,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnel]:
    """``rendezvous open`` to the hidden server, with each ``--auth``."""
    with open_tunnel(tmp_path_factory.mktemp("open"), relay.entry.uuid,
                     "--server", relay.address, "--ca", str(relay.ca),
                     "--auth", request.param) as started:
        yield started


def test_open_prints_where_to_connect(tunnel: Tunnel, relay: Relay) -> None:
    assert tunnel.banner == (f"open {tunnel.url} to reach {relay.entry.uuid} "
                             f"through {relay.address}")
    wait_for_text(tunnel.log_text, "listening")


def test_plain_httpx_follows_a_redirect_chain_through_the_tunnel(
        tunnel: Tunnel, relay: Relay) -> None:
    start = len(relay.hidden.requests)
    with httpx.Client(base_url=tunnel.url, timeout=CLIENT_TIMEOUT,
                      follow_redirects=True) as local:
        response = local.get("/redirect/5")
        assert response.status_code == 200, response.text
        assert response.json()["path"] == "/redirect/0"
        assert [r.status_code for r in response.history] == [302] * 5  # no 401 on the way
        again = local.get("/after?x=1")
        assert again.json()["path"] == "/after?x=1"
    seen = relay.seen_since(start)
    assert [r.path for r in seen] == [f"/redirect/{n}" for n in range(5, -1, -1)] + ["/after?x=1"]
    # One keep-alive connection, one pairing: every request went down the same parked leg.
    assert len({r.pairing for r in seen}) == 1
    assert_no_authorization(seen)


def test_every_request_through_the_tunnel_names_its_hidden_server(
        tunnel: Tunnel, relay: Relay) -> None:
    """The relay routes each request by its own Authorization: the tunnel puts its own in
    every head, over the local client's (here one naming some other user), and every request
    of the keep-alive connection reaches the same hidden server, none with a credential."""
    start = len(relay.hidden.requests)
    body = random.Random(9).randbytes(100_000)
    with httpx.Client(base_url=tunnel.url, timeout=CLIENT_TIMEOUT,
                      auth=httpx.BasicAuth("someone-else", "pw")) as local:
        paths = []
        for n in range(3):
            response = local.get(f"/named/{n}")
            assert response.status_code == 200, response.text
            paths.append(response.json()["path"])
            posted = local.post("/upload", content=iter([body[:n * 1000], body[n * 1000:]]))
            assert posted.json() == {"length": len(body),
                                     "sha256": hashlib.sha256(body).hexdigest()}
    assert paths == ["/named/0", "/named/1", "/named/2"]
    seen = relay.seen_since(start)
    assert [r.path for r in seen] == ["/named/0", "/upload", "/named/1", "/upload",
                                      "/named/2", "/upload"]
    assert len({r.pairing for r in seen}) == 1
    assert_no_authorization(seen)


def test_post_of_a_few_mebibytes_arrives_intact(tunnel: Tunnel, relay: Relay) -> None:
    payload = random.Random(3).randbytes(4 << 20)
    start = len(relay.hidden.requests)
    with httpx.Client(base_url=tunnel.url, timeout=CLIENT_TIMEOUT) as local:
        response = local.post("/upload", content=payload)
    assert response.status_code == 200, response.text
    assert response.json() == {"length": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest()}
    assert_no_authorization(relay.seen_since(start))


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_curl_through_the_tunnel(tunnel: Tunnel, relay: Relay) -> None:
    assert CURL is not None
    start = len(relay.hidden.requests)
    done = subprocess.run(
        [CURL, "--silent", "--show-error", "--fail", "--max-time", str(CLIENT_TIMEOUT),
         tunnel.url + "curl/path?q=1"],
        capture_output=True, timeout=CLIENT_TIMEOUT + 5, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    document = json.loads(done.stdout)
    assert document["path"] == "/curl/path?q=1"
    assert "authorization" not in [name.lower() for name, _ in document["headers"]]
    assert_no_authorization(relay.seen_since(start))


def test_local_authorization_is_replaced(tunnel: Tunnel, relay: Relay) -> None:
    """The local client's own credentials on its first request never reach the relay's routing
    nor the hidden server; ours name the ID."""
    start = len(relay.hidden.requests)
    with httpx.Client(base_url=tunnel.url, timeout=CLIENT_TIMEOUT) as local:
        response = local.get("/with-credentials", auth=("someone-else", "secret"))
    assert response.status_code == 200, response.text
    assert_no_authorization(relay.seen_since(start))


def test_garbage_from_the_local_client_gets_400_and_a_close(tunnel: Tunnel) -> None:
    with socket.create_connection(("127.0.0.1", tunnel.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"this is not HTTP\r\n\r\n")
        answer = recv_all(sock)  # returns at the close
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"Connection: close" in answer


def test_tunnel_logs_each_pairing(tunnel: Tunnel) -> None:
    with httpx.Client(base_url=tunnel.url, timeout=CLIENT_TIMEOUT) as local:
        # The hidden server closes after this answer, so the pairing ends at once.
        response = local.get("/logged", headers={"Connection": "close"})
        assert response.status_code == 200
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while "tunnel closed" not in tunnel.log_text():
        assert time.monotonic() < deadline, tunnel.log_text()
        time.sleep(0.02)
    lines = tunnel.log_text().splitlines()
    opened = [line for line in lines if "tunnel opened" in line and "target=/logged" in line]
    assert len(opened) == 1, lines
    peer = next(word for word in opened[0].split() if word.startswith("peer="))
    (closed,) = [line for line in lines if "tunnel closed" in line and peer in line]
    fields = dict(word.split("=", 1) for word in closed.split()[3:])
    assert int(fields["bytes_up"]) > 0 and int(fields["bytes_down"]) > len(response.content)
    assert fields["duration"].endswith("s")


# open: relay errors -------------------------------------------------------------------------


def test_unreachable_relay_gives_502_with_the_reason(tmp_path: Path, relay: Relay) -> None:
    dead = free_port()
    with open_tunnel(tmp_path, relay.entry.uuid, "--server", f"127.0.0.1:{dead}",
                     "--ca", str(relay.ca)) as started:
        with httpx.Client(base_url=started.url, timeout=CLIENT_TIMEOUT) as local:
            response = local.get("/anything")
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["diagnostic"] == f"cannot reach relay 127.0.0.1:{dead}: Connection refused"
        wait_for_text(started.log_text, "relay error")


def test_unknown_id_gets_the_relays_404(tmp_path: Path, relay: Relay) -> None:
    with open_tunnel(tmp_path, "nobody-here", "--server", relay.address, "--ca",
                     str(relay.ca), "--auth", "digest") as started:
        with httpx.Client(base_url=started.url, timeout=CLIENT_TIMEOUT) as local:
            first = local.get("/x")
            second = local.get("/y")  # the tunnel closed the first connection: a new pairing
        for response in (first, second):
            assert response.status_code == 404
            assert response.content == NOT_REGISTERED
        wait_for_text(started.log_text, 'reason="UUID not registered"')


def test_open_uses_a_provisioning_file(tmp_path: Path, relay: Relay) -> None:
    config = tmp_path / "hub.json"
    config.write_text(json.dumps({
        "uuid": relay.entry.uuid,
        "server": {"host": "127.0.0.1", "port": relay.server.port, "ca": relay.ca.read_text()},
        "authParams": {"base32": relay.entry.base32},
    }))
    with (open_tunnel(tmp_path, relay.entry.uuid, "--config", str(config)) as started,
          httpx.Client(base_url=started.url, timeout=CLIENT_TIMEOUT) as local):
        assert local.get("/from-config").json()["path"] == "/from-config"


# rendezvous get ---------------------------------------------------------------------------


def test_get_writes_the_body_to_stdout(relay: Relay, tmp_path: Path) -> None:
    done = rendezvous("get", relay.entry.uuid, "/status?x=1", "--server", relay.address,
                      "--ca", str(relay.ca))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == "/status?x=1"
    assert done.stderr == b""


def test_get_posts_binary_data_and_writes_a_file(relay: Relay, tmp_path: Path) -> None:
    payload = random.Random(5).randbytes(300_000)
    source, out = tmp_path / "payload.bin", tmp_path / "answer.json"
    source.write_bytes(payload)
    done = rendezvous("get", relay.entry.uuid, "/upload", "--server", relay.address,
                      "--ca", str(relay.ca), "-d", f"@{source}", "-o", str(out), "-i",
                      "-H", "Content-Type: application/octet-stream")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    head, _, body = out.read_bytes().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(body) == {"length": len(payload),
                                "sha256": hashlib.sha256(payload).hexdigest()}


def test_get_of_an_unknown_id_exits_1_with_the_diagnostic(relay: Relay) -> None:
    done = rendezvous("get", "nobody-here", "/x", "--server", relay.address,
                      "--ca", str(relay.ca))
    assert done.returncode == 1
    assert done.stderr.decode() == "rendezvous: error: 404 UUID not registered\n"
    assert done.stdout == b""


def test_get_of_a_hidden_server_error_exits_1_with_its_body(relay: Relay) -> None:
    done = rendezvous("get", relay.entry.uuid, "/x", "-X", "DELETE", "--server",
                      relay.address, "--ca", str(relay.ca))
    assert done.returncode == 1
    # The status and the hidden server's own reason phrase.
    assert done.stderr.decode() == "rendezvous: error: 501 Unsupported method ('DELETE')\n"
    assert b"Unsupported method" in done.stdout  # http.server's own error page


def test_get_with_an_unreachable_relay_exits_2(relay: Relay) -> None:
    dead = free_port()
    done = rendezvous("get", relay.entry.uuid, "/x", "--server", f"127.0.0.1:{dead}",
                      "--ca", str(relay.ca))
    assert done.returncode == 2
    assert done.stderr.decode() == (
        f"rendezvous: error: cannot reach relay 127.0.0.1:{dead}: Connection refused\n")


def test_get_with_the_wrong_certificate_exits_2(relay: Relay, tmp_path: Path) -> None:
    done = rendezvous("get", relay.entry.uuid, "/x", "--server", relay.address)
    assert done.returncode == 2
    message = done.stderr.decode()
    assert message.startswith(f"rendezvous: error: cannot reach relay {relay.address}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in message and "Traceback" not in message


# The library ------------------------------------------------------------------------------


def test_client_helper_gets_through_the_relay(relay: Relay) -> None:
    with client(relay.entry.uuid, ("127.0.0.1", relay.server.port),
                ca_pem=relay.ca.read_text(), timeout=CLIENT_TIMEOUT) as http:
        response = http.get("/library")
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "/library"


def test_async_client_helper_gets_through_the_relay(relay: Relay) -> None:
    async def fetch() -> httpx.Response:
        async with async_client(relay.entry.uuid, ("127.0.0.1", relay.server.port),
                                ca_pem=relay.ca.read_text(), timeout=CLIENT_TIMEOUT) as http:
            return await http.get("/async-library")

    response = asyncio.run(fetch())
    assert response.json()["path"] == "/async-library"


def test_digest_answer_matches_rfc_7616() -> None:
    """RFC 2617 §3.5's worked example (MD5, qop=auth)."""
    challenge = ('Digest realm="testrealm@host.com", qop="auth,auth-int", '
                 'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
                 'opaque="5ccc069c403ebaf9f0171e9517f40e41"')
    value = digest_authorization(challenge, "Mufasa", "Circle Of Life", "GET", "/dir/index.html",
                                 cnonce="0a4f113b")
    assert value is not None
    assert 'response="6629fae49393a05397450978507c4ef1"' in value
    assert "qop=auth," in value and "nc=00000001" in value
    assert 'opaque="5ccc069c403ebaf9f0171e9517f40e41"' in value


def test_plain_requests_with_digest_auth_needs_no_rendezvous_code(relay: Relay) -> None:
    """What the docs promise a mobile developer: stock ``requests``, the ID as user name."""
    response = requests.get(f"https://{relay.address}/plain-requests", verify=str(relay.ca),
                            auth=HTTPDigestAuth(relay.entry.uuid, "x"), timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "/plain-requests"
