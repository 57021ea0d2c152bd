"""The hidden-server agent: ``rendezvous hidden`` as a real process, and ``HiddenAgent`` as a
library, against a real relay (TLS on 127.0.0.1, in a thread of this process).

Mobile clients are stock ones (curl, httpx, websockets) naming the hidden server's ID as their
user name; the local service behind the agent is a stdlib HTTP server or a websockets server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import inspect
import json
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from harness import PARKED, ServerThread, make_certificate, running_server
from hidden_support import (
    BIG,
    START_TIMEOUT,
    AgentProcess,
    LocalHTTP,
    payload,
    total_parks,
    wait_until,
    write_provisioning_for,
)
from support import stop_process
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from rendezvous.agent import HiddenAgent, hidden
from rendezvous.cli import build_parser, main
from rendezvous.errors import ProvisioningError
from rendezvous.protocol.responses import error_body
from rendezvous.provisioning import Provisioning, load_provisioning
from rendezvous.registry import new_secret, open_registry
from rendezvous.tls import server_ssl_context

pytestmark = pytest.mark.timeout(60)

CURL = shutil.which("curl")
CLIENT_TIMEOUT = 20.0
NOT_REGISTERED = "UUID not registered"
REFUSAL = ("relay refused our credentials (401 invalid request): wrong secret, entry removed, "
           "or clock off by more than one step")


StartAgent = Callable[..., AgentProcess]


@pytest.fixture
def local_http() -> Iterator[LocalHTTP]:
    """The local HTTP service the agent forwards to."""
    service = LocalHTTP()
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[StartAgent]:
    """``start_agent(config, forward, *flags)``: an agent process, stopped after the test."""
    agents: list[AgentProcess] = []

    def start(config: Path, forward: str, *flags: str) -> AgentProcess:
        log = tmp_path / f"agent-{len(agents)}.log"
        agent = AgentProcess(log, ["--config", str(config), "--forward", forward, *flags])
        agents.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                stop_process(agent.proc)


def cert(server: ServerThread) -> str:
    assert server.tls is not None
    return str(server.tls.cert_file)


def get(server: ServerThread, uuid: str, path: str) -> httpx.Response:
    """One request on a fresh connection (a pairing of its own), Digest auth as stock."""
    with httpx.Client(verify=cert(server), timeout=CLIENT_TIMEOUT) as client:
        response = client.get(server.url() + path, auth=httpx.DigestAuth(uuid, "x"))
        response.read()
        return response


def rejections(server: ServerThread, reason: str | None = None) -> int:
    """How many requests the relay refused (for one reason, or for any)."""
    def count() -> int:
        assert server.server.hub is not None
        counter = server.server.hub.stats.rejections
        return counter[reason] if reason is not None else sum(counter.values())
    return int(server.sync(count))


# The agent process -------------------------------------------------------------------------


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_curl_and_httpx_reach_the_local_service_with_big_transfers(
        tmp_path: Path, local_http: LocalHTTP, start_agent: StartAgent) -> None:
    assert CURL is not None
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        config = write_provisioning_for(s, entry, tmp_path / "hub.json")
        agent = start_agent(config, local_http.address, "--pool", "2")
        s.wait_parked(entry.uuid, 2, timeout=START_TIMEOUT)

        args = [CURL, "--silent", "--show-error", "--fail", "--max-time", str(CLIENT_TIMEOUT),
                "--digest", "-u", f"{entry.uuid}:x", "--cacert", cert(s),
                s.url() + "/hello?via=curl"]
        done = subprocess.run(args, capture_output=True, timeout=CLIENT_TIMEOUT + 5, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace") + agent.text()
        document = json.loads(done.stdout)
        assert document["path"] == "/hello?via=curl"
        assert "authorization" not in [name.lower() for name, _ in document["headers"]]

        upload = random.Random(1).randbytes(BIG)
        with httpx.Client(verify=cert(s), timeout=CLIENT_TIMEOUT) as client:
            auth = httpx.DigestAuth(entry.uuid, "x")
            response = client.get(s.url() + "/hello?via=httpx", auth=auth)
            assert response.status_code == 200, response.text
            assert response.json()["path"] == "/hello?via=httpx"

            # The same client and auth: Digest goes pre-emptively, on the paired connection.
            started = time.monotonic()
            response = client.post(s.url() + "/upload", content=upload, auth=auth)
            assert response.status_code == 200, response.text
            assert response.json() == {"length": BIG,
                                       "sha256": hashlib.sha256(upload).hexdigest()}
            uploaded = time.monotonic() - started

            started = time.monotonic()
            digest = hashlib.sha256()
            size = 0
            with client.stream("GET", s.url() + f"/download/{BIG}", auth=auth) as stream:
                assert stream.status_code == 200
                for chunk in stream.iter_bytes():
                    digest.update(chunk)
                    size += len(chunk)
            downloaded = time.monotonic() - started
        assert size == BIG
        assert digest.hexdigest() == hashlib.sha256(payload(BIG)).hexdigest()
        # Generous bounds: they catch a stall, not a slow machine.
        assert uploaded < 30 and downloaded < 30, (uploaded, downloaded)

        assert agent.proc.poll() is None
        assert agent.terminate() == 0
    log = agent.text()
    assert "parked" in log and "pairing closed" in log and "stopped" in log


def test_websocket_service_behind_the_agent(tmp_path: Path, start_agent: StartAgent) -> None:
    def echo(connection: ServerConnection) -> None:
        for message in connection:
            connection.send(message)

    with ws_serve(echo, "127.0.0.1", 0, max_size=None) as ws_server, \
            running_server(tmp_path) as s:
        port = ws_server.socket.getsockname()[1]
        thread = threading.Thread(target=ws_server.serve_forever, daemon=True)
        thread.start()
        try:
            entry = s.add_entry()
            config = write_provisioning_for(s, entry, tmp_path / "hub.json")
            agent = start_agent(config, f"127.0.0.1:{port}", "--pool", "2")
            s.wait_parked(entry.uuid, 2, timeout=START_TIMEOUT)

            basic = base64.b64encode(f"{entry.uuid}:x".encode()).decode()
            blob = random.Random(2).randbytes(3 << 20)
            with ws_connect(f"wss://127.0.0.1:{s.port}/chat", ssl=s.client_context(),
                            additional_headers={"Authorization": f"Basic {basic}"},
                            open_timeout=CLIENT_TIMEOUT, max_size=None) as ws:
                ws.send("hello through the relay")
                assert ws.recv(timeout=CLIENT_TIMEOUT) == "hello through the relay"
                ws.send(blob)
                assert ws.recv(timeout=CLIENT_TIMEOUT) == blob
            assert agent.terminate() == 0
        finally:
            ws_server.shutdown()
            thread.join(5)


def test_fifty_concurrent_clients_with_a_pool_of_four(
        tmp_path: Path, local_http: LocalHTTP, start_agent: StartAgent) -> None:
    clients = 50
    with running_server(tmp_path, pair_wait=2.0) as s:
        entry = s.add_entry()
        config = write_provisioning_for(s, entry, tmp_path / "hub.json")
        agent = start_agent(config, local_http.address, "--pool", "4")
        s.wait_parked(entry.uuid, 4, timeout=START_TIMEOUT)
        barrier = threading.Barrier(clients, timeout=CLIENT_TIMEOUT)

        def fetch(index: int) -> tuple[int, str]:
            with httpx.Client(verify=cert(s), timeout=CLIENT_TIMEOUT) as client:
                barrier.wait()
                response = client.get(s.url() + f"/sleep/0.05?client={index}",
                                      auth=httpx.DigestAuth(entry.uuid, "x"))
                return response.status_code, response.text

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(fetch, range(clients)))
        for index, (status, text) in enumerate(results):
            assert status == 200, (index, text, agent.text()[-3000:])
            assert json.loads(text)["path"] == f"/sleep/0.05?client={index}"
        assert rejections(s, NOT_REGISTERED) == 0
        assert local_http.requests == clients
        s.wait_parked(entry.uuid, 4, timeout=10)  # every slot parked again
        assert agent.terminate() == 0


def test_relay_restart_and_local_service_outage(
        tmp_path: Path, local_http: LocalHTTP, start_agent: StartAgent) -> None:
    with running_server(tmp_path) as first:
        entry = first.add_entry()
        port = first.port
        config = write_provisioning_for(first, entry, tmp_path / "hub.json")
        agent = start_agent(config, local_http.address, "--pool", "2", "--backoff-cap", "2",
                            "--status-interval", "1")
        first.wait_parked(entry.uuid, 2, timeout=START_TIMEOUT)
        assert get(first, entry.uuid, "/hello").status_code == 200
        # Stop only once the agent's replacement has parked: a TLS handshake still under way
        # when the harness closes the relay's loop upsets the harness (not the agent).
        first.wait_parked(entry.uuid, 2)
        first.stop()

    time.sleep(1.0)  # the relay is away: the agent's attempts fail and it backs off
    with running_server(tmp_path, port=port) as second:
        second.call(second.registry.add(entry))  # the same registry entry
        started = time.monotonic()
        second.wait_parked(entry.uuid, 2, timeout=10)
        assert time.monotonic() - started < 10
        assert get(second, entry.uuid, "/hello?after=restart").json()["path"] == \
            "/hello?after=restart"

        local_http.stop()
        response = get(second, entry.uuid, "/hello?service=down")
        assert response.status_code == 502
        assert response.headers["connection"] == "close"
        diagnostic = response.json()["error"]["diagnostic"]
        assert diagnostic.startswith(f"local service unreachable: {local_http.address}: ")
        assert response.json()["error"]["permanent"] is False

        local_http.start()  # back on the same port
        assert get(second, entry.uuid, "/hello?service=back").status_code == 200
        assert agent.proc.poll() is None
        assert agent.terminate() == 0
    log = agent.text()
    assert "park failed" in log and "retry_in=" in log, log
    assert "local service unreachable" in log
    assert " status " in log  # the periodic summary


def test_wrong_secret_is_reported_once_and_retried_slowly(
        tmp_path: Path, start_agent: StartAgent) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        config = write_provisioning_for(s, entry, tmp_path / "hub.json", base32=new_secret())
        agent = start_agent(config, "127.0.0.1:9", "--pool", "4", "--auth-retry", "1")
        agent.wait_for_log(REFUSAL, timeout=START_TIMEOUT)
        before = rejections(s)
        time.sleep(3.0)
        attempts = rejections(s) - before
        # One attempt per --auth-retry (±10 %), never one per slot or a tight loop.
        assert 1 <= attempts <= 5, attempts
        assert s.parked(entry.uuid) == 0
        assert agent.proc.poll() is None
        assert agent.terminate() == 0
    # Reported once per streak (the status lines repeat it as the last error).
    reports = [line for line in agent.text().splitlines() if " park refused " in line]
    assert len(reports) == 1 and REFUSAL in reports[0], agent.text()


def test_sigterm_lets_an_active_pairing_finish(
        tmp_path: Path, local_http: LocalHTTP, start_agent: StartAgent) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        config = write_provisioning_for(s, entry, tmp_path / "hub.json")
        agent = start_agent(config, local_http.address, "--pool", "2", "--grace", "8")
        s.wait_parked(entry.uuid, 2, timeout=START_TIMEOUT)
        result: list[httpx.Response] = []

        def slow_request() -> None:
            with httpx.Client(verify=cert(s), timeout=CLIENT_TIMEOUT,
                              headers={"Connection": "close"}) as client:
                result.append(client.get(s.url() + "/sleep/1.5",
                                         auth=httpx.DigestAuth(entry.uuid, "x")))

        thread = threading.Thread(target=slow_request)
        thread.start()
        assert local_http.sleeping.wait(CLIENT_TIMEOUT)
        signalled = time.monotonic()
        status = agent.terminate()
        took = time.monotonic() - signalled
        thread.join(CLIENT_TIMEOUT)
        assert status == 0
        assert result and result[0].status_code == 200, result
        assert result[0].json()["path"] == "/sleep/1.5"
        assert 1.0 < took < 8.0, took  # waited for the pairing, not for the whole grace
    log = agent.text()
    assert "pairing closed" in log and "cutting pairings" not in log, log


def test_sighup_after_users_rotate_parks_with_the_new_secret(
        tmp_path: Path, local_http: LocalHTTP, start_agent: StartAgent) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    with running_server(tmp_path, registry=open_registry(registry_url)) as s:
        entry = s.add_entry()
        config = write_provisioning_for(s, entry, tmp_path / "hub.json")
        agent = start_agent(config, local_http.address, "--pool", "2",
                            "--server", f"127.0.0.1:{s.port}")
        s.wait_parked(entry.uuid, 2, timeout=START_TIMEOUT)
        result: list[httpx.Response] = []

        def slow_request() -> None:  # a pairing in flight across the reload
            with httpx.Client(verify=cert(s), timeout=CLIENT_TIMEOUT,
                              headers={"Connection": "close"}) as client:
                result.append(client.get(s.url() + "/sleep/3",
                                         auth=httpx.DigestAuth(entry.uuid, "x")))

        thread = threading.Thread(target=slow_request)
        thread.start()
        assert local_http.sleeping.wait(CLIENT_TIMEOUT)
        s.wait_parked(entry.uuid, 2)  # its slot parked a replacement, with the old secret
        assert main(["users", "rotate", entry.uuid, "--registry", registry_url,
                     "--out", str(config), "--server-host", "127.0.0.1",
                     "--server-port", str(s.port), "--ca", cert(s)]) == 0
        assert load_provisioning(config).base32 != entry.base32
        parks, refused = total_parks(s), rejections(s)
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for_log("reloaded provisioning", timeout=10)
        deadline = time.monotonic() + 10
        while total_parks(s) < parks + 2:  # both slots parked again: the old secret is void
            assert time.monotonic() < deadline, agent.text()
            time.sleep(0.05)
        assert rejections(s) == refused  # not one CONNECT with the old secret
        s.wait_parked(entry.uuid, 2)  # the links parked with the old secret were recycled
        thread.join(CLIENT_TIMEOUT)
        assert result and result[0].status_code == 200, result  # the pairing went on
        assert get(s, entry.uuid, "/after").json()["path"] == "/after"
        # A file that no longer reads: said so, and the agent goes on with the one it has.
        config.write_text("{not json")
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for_log("reload failed, keeping the old provisioning", timeout=10)
        assert get(s, entry.uuid, "/still").json()["path"] == "/still"
        assert agent.terminate() == 0
    log = agent.text()
    # Each link parked with the old secret was recycled by the reload, unless the relay had
    # closed it first: it revokes connections parked under a rotated secret (server/revocation).
    # (Both slots parking anew with the new secret, above, is what the reload must achieve.)
    assert log.count("reason=reloaded") <= 2, log


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [
        (["--config", str(tmp_path / "missing.json"), "--forward", "127.0.0.1:80"],
         "cannot read provisioning file"),
        (["--config", str(bad), "--forward", "127.0.0.1:80"], "is not valid JSON"),
        (["--config", str(bad), "--forward", "localhost"], "--forward must be HOST:PORT"),
        (["--config", str(bad), "--forward", "80", "--server", "relay:x"],
         "--server must be HOST:PORT"),
    ]
    for args, message in cases:
        assert main(["hidden", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    # The command line and the library default alike (both read config.py's values).
    defaults = build_parser().parse_args(["hidden", "--config", "f", "--forward", "1"])
    library = inspect.signature(hidden.HiddenAgent).parameters
    for name in ("pool", "max_park_age", "backoff_cap", "auth_retry", "status_interval", "grace"):
        assert getattr(defaults, name) == library[name].default, name


# The library ---------------------------------------------------------------------------------


async def reverse_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serves one HTTP request itself, no local port: answers its body reversed."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length)
    answer = json.dumps({"request": lines[0], "reversed": body[::-1].decode()}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(answer), answer))
    await writer.drain()


def test_library_agent_serves_pairings_with_an_in_process_handler(tmp_path: Path) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))

        async def scenario() -> None:
            agent = HiddenAgent(provisioning, handler=reverse_handler, pool=2)
            running = asyncio.create_task(agent.run())
            await wait_until(lambda: agent.status().parked == 2)
            async with httpx.AsyncClient(verify=cert(s), timeout=CLIENT_TIMEOUT) as client:
                responses = await asyncio.gather(*(
                    client.post(s.url() + f"/echo/{i}", content=f"message {i}".encode(),
                                auth=httpx.BasicAuth(entry.uuid, "x"))
                    for i in range(5)))
            for i, response in enumerate(responses):
                assert response.status_code == 200, response.text
                assert response.json() == {"request": f"POST /echo/{i} HTTP/1.1",
                                           "reversed": f"message {i}"[::-1]}
            await wait_until(lambda: agent.status().served == 5 and agent.status().parked == 2)
            status = agent.status()
            assert status.active == 0 and status.failures == 0 and status.last_error is None
            assert status.bytes_up > 5 * len("POST /echo/0 HTTP/1.1\r\n\r\nmessage 0")
            assert status.bytes_down > 5 * len("HTTP/1.1 200 OK\r\n\r\n")
            await agent.stop()
            await asyncio.wait_for(running, 5)
            assert agent.status().parked == 0

        asyncio.run(scenario())
        s.wait_parked(entry.uuid, 0, timeout=2.0)  # the relay saw them close


def test_library_request_arriving_with_the_200_is_not_lost(tmp_path: Path) -> None:
    # No settle time and a client already waiting: the relay writes the 200 and the request
    # back to back, so they usually reach the agent in one read.
    with running_server(tmp_path, settle=0.0, pair_wait=10.0) as s:
        entry = s.add_entry()
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))

        async def scenario() -> None:
            async with httpx.AsyncClient(verify=cert(s), timeout=CLIENT_TIMEOUT) as client:
                waiting = asyncio.create_task(client.post(
                    s.url() + "/early", content=b"first bytes",
                    auth=httpx.BasicAuth(entry.uuid, "x")))
                await asyncio.sleep(0.5)  # the relay holds the client, waiting for a park
                assert not waiting.done()
                agent = HiddenAgent(provisioning, handler=reverse_handler, pool=1)
                running = asyncio.create_task(agent.run())
                response = await waiting
            assert response.status_code == 200, response.text
            assert response.json()["reversed"] == "setyb tsrif"
            await agent.stop(1)
            await asyncio.wait_for(running, 5)

        asyncio.run(scenario())


def test_library_recycles_old_parked_connections(tmp_path: Path) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))

        async def scenario() -> None:
            agent = HiddenAgent(provisioning, handler=reverse_handler, pool=2, max_park_age=0.4)
            running = asyncio.create_task(agent.run())
            await wait_until(lambda: agent.status().parked == 2)
            # Each slot recycles its link every 0.34-0.4 s: replacement first, then the close.
            await wait_until(lambda: total_parks(s) >= 8)
            assert agent.status().parked == 2 and agent.status().failures == 0
            # The recycled links are gone from the relay too (it saw their TLS close): its pool
            # holds the two live ones, and a client is paired with a live one.
            await wait_until(lambda: s.parked(entry.uuid) == 2, timeout=2.0)
            async with httpx.AsyncClient(verify=cert(s), timeout=5.0) as client:
                response = await client.post(s.url() + "/after", content=b"abc",
                                             auth=httpx.BasicAuth(entry.uuid, "x"))
            assert response.json()["reversed"] == "cba"
            await agent.stop(1)
            await asyncio.wait_for(running, 5)
            assert agent.status().parked == 0

        asyncio.run(scenario())
        s.wait_parked(entry.uuid, 0, timeout=2.0)


def test_library_honours_retry_after(tmp_path: Path) -> None:
    # The relay answers 429 once an ID has had its burst of failed CONNECTs.
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        config = write_provisioning_for(s, entry, tmp_path / "hub.json", base32=new_secret())
        provisioning = load_provisioning(config)

        async def scenario() -> None:
            agent = HiddenAgent(provisioning, handler=reverse_handler, pool=2, auth_retry=0.02)
            running = asyncio.create_task(agent.run())
            await wait_until(lambda: "429" in (agent.status().last_error or ""))
            assert "relay is limiting our attempts (429 too many attempts)" in \
                (agent.status().last_error or "")
            failures = agent.status().failures
            await asyncio.sleep(1.0)  # Retry-After is many seconds: no attempt meanwhile
            assert agent.status().failures == failures
            await agent.stop(0)
            await asyncio.wait_for(running, 5)

        asyncio.run(scenario())


def test_library_unreachable_local_service_gets_502(tmp_path: Path) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))

        async def scenario() -> None:
            agent = HiddenAgent(provisioning, handler=hidden.forward_to("127.0.0.1", 9), pool=1)
            running = asyncio.create_task(agent.run())
            await wait_until(lambda: agent.status().parked == 1)
            async with httpx.AsyncClient(verify=cert(s), timeout=CLIENT_TIMEOUT) as client:
                response = await client.get(s.url() + "/", auth=httpx.BasicAuth(entry.uuid, "x"))
            assert response.status_code == 502
            assert response.reason_phrase == "Bad Gateway"
            assert response.headers["content-type"] == "application/json"
            assert response.headers["connection"] == "close"
            assert int(response.headers["content-length"]) == len(response.content)
            diagnostic = response.json()["error"]["diagnostic"]
            assert diagnostic.startswith("local service unreachable: 127.0.0.1:9: ")
            assert response.content == error_body(diagnostic)
            await agent.stop(1)
            await asyncio.wait_for(running, 5)

        asyncio.run(scenario())


def test_a_link_parking_during_a_reload_is_recycled_at_once(tmp_path: Path) -> None:
    """A reload while a CONNECT waits for the relay's answer: that link asked with the old file,
    so once parked it is replaced at once, not after --max-park-age."""
    tls = make_certificate(tmp_path)
    provisioning = Provisioning(uuid="hub", label="", host="127.0.0.1", port=9,
                                ca_pem=tls.cert_file.read_text(), base32=new_secret(), step=30,
                                digits=6, proxy_protocol=2)
    connects: asyncio.Queue[str] = asyncio.Queue()
    answer = asyncio.Event()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0].decode()
        await connects.put(line)
        await answer.wait()  # held until the test has reloaded the agent
        writer.write(PARKED)
        await reader.read()  # parked until the agent lets go

    async def scenario() -> None:
        server = await asyncio.start_server(relay, "127.0.0.1", 0,
                                            ssl=server_ssl_context(tls))
        port = server.sockets[0].getsockname()[1]
        agent = HiddenAgent(provisioning, handler=reverse_handler, pool=1,
                            server=("127.0.0.1", port), max_park_age=600)
        running = asyncio.create_task(agent.run())
        try:
            first = await asyncio.wait_for(connects.get(), 10)
            assert first.endswith("&proxy=2 HTTP/1.1")
            agent.reload(dataclasses.replace(provisioning, proxy_protocol=1))
            answer.set()
            again = await asyncio.wait_for(connects.get(), 10)  # not after 600 s
            assert again.endswith("&proxy=1 HTTP/1.1")
        finally:
            await agent.stop(1)
            await asyncio.wait_for(running, 5)
            server.close()

    asyncio.run(scenario())


def test_library_reload_refuses_another_id_and_keeps_the_old_file(tmp_path: Path) -> None:
    with running_server(tmp_path) as s:
        entry, other = s.add_entry(), s.add_entry()
        mine = load_provisioning(write_provisioning_for(s, entry, tmp_path / "a.json"))
        theirs = load_provisioning(write_provisioning_for(s, other, tmp_path / "b.json"))
        agent = HiddenAgent(mine, handler=reverse_handler)
        with pytest.raises(ProvisioningError, match="start another agent"):
            agent.reload(theirs)
        assert agent.provisioning is mine
        broken = dataclasses.replace(mine, base32=new_secret(), ca_pem="not a certificate")
        with pytest.raises(ProvisioningError, match=r"server\.ca"):
            agent.reload(broken)
        assert agent.provisioning is mine
