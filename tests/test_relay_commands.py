"""The commands an operator runs beside a running relay, each in its own process: files that
point at the relay that made them, ``rendezvous status``, and visitors with a password through
``open`` and ``get`` (issue 12)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import requests
from harness import PARKED, recv_exactly, recv_until
from hidden_support import AgentProcess, ProxyHeaderService, proxy_source
from support import free_port, stop_process, wait_for_port

from rendezvous.config import AdminConfig, is_loopback_host
from rendezvous.protocol.proxy import V2_SIGNATURE
from rendezvous.protocol.totp import current_token
from rendezvous.provisioning import Provisioning, load_provisioning
from rendezvous.tls import client_ssl_context

pytestmark = pytest.mark.timeout(120)

RUN_TIMEOUT = 30.0
START_TIMEOUT = 20.0


@dataclass
class Result:
    code: int
    out: str
    err: str


def rendezvous(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the command in another process, with no RENDEZVOUS_* variables but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")}
    proc = subprocess.run([sys.executable, "-m", "rendezvous", *args], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False, env={**clean, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(*args: str) -> Result:
    result = rendezvous(*args)
    assert result.code == 0, result.err
    return result


@dataclass
class Relay:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path

    def users(self, *args: str) -> Result:
        return ok("users", *args, "--data-dir", str(self.data_dir))


@contextmanager
def serve(tmp_path: Path, data_dir: Path, *extra: str, port: int = 0) -> Iterator[Relay]:
    """``rendezvous serve`` on 127.0.0.1 in another process; stopped (SIGTERM) afterwards."""
    port = port or free_port()
    log = tmp_path / f"serve-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--data-dir", str(data_dir), "--pair-wait", "0.5", *extra],
            stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port("127.0.0.1", port, START_TIMEOUT, proc)
        wait_for_text(log, "recorded public address")
        yield Relay(proc, port, data_dir, log)
    finally:
        stop_process(proc)


def wait_for_text(log: Path, text: str) -> None:
    for _ in range(200):
        if text in log.read_text():
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"{text!r} not in {log}: {log.read_text()}")


def park(prov: Provisioning, port: int | None = None) -> ssl.SSLSocket:
    """Park one connection with ``prov`` (at its own port unless told another)."""
    context = client_ssl_context(prov.ca_pem)
    raw = socket.create_connection(("127.0.0.1", port or prov.port), timeout=5)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    token = current_token(prov.base32, prov.step, prov.digits)
    sock.sendall(f"CONNECT uuid:{prov.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
    assert recv_exactly(sock, len(PARKED)) == PARKED
    return sock


def answer_once(hidden: ssl.SSLSocket, body: bytes = b"hello\n") -> threading.Thread:
    """A thread that reads one request on the parked ``hidden`` and answers ``body``."""

    def run() -> None:
        with hidden:
            recv_until(hidden, b"\r\n\r\n")
            hidden.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                           % len(body) + body)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def warnings(result: Result) -> list[str]:
    return [line for line in result.err.splitlines() if "warning" in line]


# ---------------------------------------------------------------------------- files


def test_files_point_at_the_relay_that_made_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serve(tmp_path, data, "--server-host", "127.0.0.1") as relay:
        # The start hint says what files will say, where that is recorded, how to change it.
        banner = relay.log.read_text()
        assert f"provisioning files will say: server 127.0.0.1:{relay.port}" in banner
        assert str((data / "relay.json").resolve()) in banner and "--public-host NAME" in banner
        cert = (data / "cert.pem").read_text()

        # No flags: the port the relay listens on (not 8899) and its certificate.
        added = relay.users("add", "--uuid", "a")
        a = load_provisioning(data / "provision" / "a.json")
        assert (a.host, a.port, a.ca_pem) == ("127.0.0.1", relay.port, cert)
        assert "relay.json" in added.out
        # The host came from the relay's record: say how to give the public name.
        assert any("--public-host NAME" in w for w in warnings(added)), added.err
        park(a).close()

        # Given flags: kept by a later rotation without flags (issue 10's bug).
        given = relay.users("add", "--uuid", "b", "--server-host", "127.0.0.1",
                            "--server-port", "18901")
        assert not any("pass --server-host" in w or "--server-host NAME" in w
                       for w in warnings(given)), given.err
        assert any("public name" in w for w in warnings(given)), given.err
        b = load_provisioning(data / "provision" / "b.json")
        assert (b.host, b.port) == ("127.0.0.1", 18901)
        rotated = relay.users("rotate", "b")
        b2 = load_provisioning(data / "provision" / "b.json")
        assert (b2.host, b2.port, b2.ca_pem) == ("127.0.0.1", 18901, b.ca_pem)
        assert b2.base32 != b.base32
        assert "as in the file it replaces" in rotated.out

        relay.users("rotate", "a")
        a2 = load_provisioning(data / "provision" / "a.json")
        assert (a2.host, a2.port) == ("127.0.0.1", relay.port)
        park(a2).close()
    # Remembered, not re-guessed, after the relay stops.
    relay.users("add", "--uuid", "c")
    c = load_provisioning(data / "provision" / "c.json")
    assert (c.host, c.port) == ("127.0.0.1", relay.port)


# What node-rendezvous's registrar stored for a hidden server (tests/registry/).
ORIGINAL_VALUE = '{"authParams":{"base32":"JBSWY3DPEHPK3PXP","step":30}}'
# The SQLite table before entries had a PROXY option or a relay address of their own.
OLD_TABLE = ("CREATE TABLE entries (uuid TEXT PRIMARY KEY, base32 TEXT NOT NULL, step INTEGER "
             "NOT NULL, digits INTEGER NOT NULL, label TEXT NOT NULL DEFAULT '', created REAL "
             "NOT NULL, updated REAL NOT NULL, visitor TEXT NOT NULL DEFAULT '', name TEXT NOT "
             "NULL DEFAULT '')")


def test_a_rotation_keeps_the_relay_address_given_for_the_entry(
        tmp_path: Path, redis_registry_url: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "registry.sqlite3") as old:  # a registry from before
        old.execute(OLD_TABLE)
        old.execute("INSERT INTO entries VALUES ('old', 'JBSWY3DPEHPK3PXP', 30, 6, '', 1, 1, '',"
                    " '')")
    old.close()
    admin_port = free_port()
    with serve(tmp_path, data, "--server-host", "localhost",
               "--admin", f"127.0.0.1:{admin_port}") as relay:
        # Its own address (the relay's record says localhost), in a file of its own.
        first = tmp_path / "own.json"
        relay.users("add", "--uuid", "own", "--server-host", "127.0.0.1", "--out", str(first))
        own = load_provisioning(first)
        assert (own.host, own.port) == ("127.0.0.1", relay.port)
        assert "relay:    host 127.0.0.1 (its own" in relay.users("show", "own").out
        first.unlink()  # handed to the hidden server: the rotation finds no old file
        second = tmp_path / "own-2.json"
        rotated = relay.users("rotate", "own", "--out", str(second))
        own2 = load_provisioning(second)
        assert (own2.host, own2.port, own2.ca_pem) == ("127.0.0.1", relay.port, own.ca_pem)
        assert own2.base32 != own.base32
        assert "host as recorded for the entry" in rotated.out
        park(own2).close()
        shown = json.loads(relay.users("rotate", "own", "--json").out)  # no file at all
        assert shown["server"]["host"] == "127.0.0.1"

        # Given again, it changes; the port too is the entry's once given.
        third = tmp_path / "own-3.json"
        relay.users("rotate", "own", "--server-host", "127.0.0.2", "--server-port", "18443",
                    "--out", str(third))
        relay.users("rotate", "own", "--out", str(third))
        own3 = load_provisioning(third)
        assert (own3.host, own3.port) == ("127.0.0.2", 18443)
        # The admin page's file and its rotation say it too.
        wait_for_port("127.0.0.1", admin_port, START_TIMEOUT, relay.proc)
        base = f"http://127.0.0.1:{admin_port}"
        with requests.Session() as client:
            page = client.get(base + "/entry", params={"id": "own"}, timeout=10).text
            assert re.search(r'id="own-relay">its own: host <code>127.0.0.2</code>, port 18443',
                             page), page
            confirm = client.get(base + "/confirm", params={"action": "rotate", "id": "own"},
                                 timeout=10).text
            csrf = re.search(r'name="csrf" value="([^"]+)"', confirm)
            assert csrf
            rotated_here = client.post(base + "/rotate", data={"csrf": csrf.group(1),
                                                               "id": "own"},
                                       allow_redirects=False, timeout=10)
            assert rotated_here.status_code == 303, rotated_here.text
            doc = client.get(base + "/provisioning.json", params={"id": "own"},
                             timeout=10).json()
            assert doc["server"]["host"] == "127.0.0.2" and doc["server"]["port"] == 18443
            assert doc["authParams"]["base32"] != own3.base32

        # Entries without one follow the relay's record: a new one, one from the old table,
        # and one the original wrote in Redis.
        relay.users("add", "--uuid", "plain", "--json")
        redis_raw = redis.Redis.from_url(redis_registry_url)
        redis_raw.set("original", ORIGINAL_VALUE)
        redis_raw.close()
        for uuid, registry in (("plain", ()), ("old", ()),
                               ("original", ("--registry", redis_registry_url))):
            out = tmp_path / f"{uuid}.json"
            relay.users("rotate", uuid, "--out", str(out), *registry)
            again = load_provisioning(out)
            assert (again.host, again.port) == ("localhost", relay.port), uuid
            assert "relay.json" in relay.users("show", uuid, *registry).out
        park(load_provisioning(tmp_path / "old.json")).close()


def test_a_file_made_before_the_first_start_carries_the_relays_certificate(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    made = ok("users", "add", "--uuid", "early", "--data-dir", str(data), "--server-port",
              str(port))
    early = load_provisioning(data / "provision" / "early.json")
    assert early.ca_pem is not None and "made now" in made.out
    assert early.port == port
    with serve(tmp_path, data, port=port) as relay:
        served = ssl.get_server_certificate(("127.0.0.1", relay.port))
        assert served.strip() == early.ca_pem.strip()
        park(early).close()  # the file as written, its pinned CA and all


def test_a_broken_relay_record_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "relay.json").write_text('{"host": "x"}')
    result = rendezvous("users", "add", "--data-dir", str(data))
    assert result.code == 2
    assert "relay.json is not a relay record" in result.err
    assert "delete it" in result.err


def test_one_loopback_rule() -> None:
    for host in ("localhost", "LOCALHOST.", "hub.localhost", "127.0.0.1", "127.9.8.7", "::1",
                 "[::1]", "localhost.localdomain"):
        assert is_loopback_host(host), host
    for host in ("", "0.0.0.0", "::", "example.com", "localhost.example.com", "10.0.0.1"):
        assert not is_loopback_host(host), host
    AdminConfig(host="admin.localhost")  # no password needed on a loopback name


# ---------------------------------------------------------------------------- status


def test_status_shows_what_the_relay_holds_per_id(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serve(tmp_path, data, "--server-host", "127.0.0.1") as relay:
        relay.users("add", "--uuid", "porch-hub", "--label", "porch")
        relay.users("add", "--uuid", "shed-hub", "--label", "shed")
        prov = load_provisioning(data / "provision" / "porch-hub.json")
        with contextlib.ExitStack() as sockets:
            parked = [sockets.enter_context(park(prov)) for _ in range(2)]
            # One pairing held open: a visitor whose request the hidden server never answers.
            visitor = sockets.enter_context(client_ssl_context(prov.ca_pem).wrap_socket(
                socket.create_connection(("127.0.0.1", relay.port), timeout=5),
                server_hostname="127.0.0.1"))
            visitor.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
                            b"cG9yY2gtaHViOng=\r\n\r\n")  # porch-hub:x
            paired = [s for s in parked if _readable(s)]
            assert len(paired) == 1

            shown = ok("status", "--data-dir", str(data))
            lines = shown.out.splitlines()
            assert lines[0].startswith("relay on 127.0.0.1:"), shown.out
            assert "1 parked, 1 active" in lines[0], shown.out
            assert lines[1].split() == ["ID", "LABEL", "PARKED", "ACTIVE", "PAIRINGS", "BYTES",
                                        "LAST", "SEEN"]
            porch = next(line for line in lines if line.startswith("porch-hub"))
            assert porch.split()[1:5] == ["porch", "1", "1", "1"] and "s ago" in porch
            shed = next(line for line in lines if line.startswith("shed-hub"))
            assert shed.split()[1:5] == ["shed", "0", "0", "0"] and shed.endswith("never")

            doc = json.loads(ok("status", "--json", "--data-dir", str(data)).out)
            porch_numbers = doc["ids"]["porch-hub"]
            assert (porch_numbers["parked"], porch_numbers["active"]) == (1, 1)
            assert porch_numbers["label"] == "porch" and doc["pid"] == relay.proc.pid
        socket_file = Path(json.loads((data / "relay.json").read_text())["status"])
        assert socket_file.exists() and socket_file.stat().st_mode & 0o077 == 0
    gone = rendezvous("status", "--data-dir", str(data))
    assert gone.code == 2 and "no relay answers" in gone.err
    assert not socket_file.exists()
    never = rendezvous("status", "--data-dir", str(tmp_path / "other"))
    assert never.code == 2 and "no relay has started" in never.err


def _readable(sock: ssl.SSLSocket) -> bool:
    """Whether the relay sent ``sock`` something (the visitor's request) within a moment."""
    sock.settimeout(1.0)
    try:
        return bool(sock.recv(4096))
    except TimeoutError:
        return False
    finally:
        sock.settimeout(5.0)


# ---------------------------------------------------------------------------- visitors


def test_open_and_get_log_in_with_the_visitor_password(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serve(tmp_path, data, "--server-host", "127.0.0.1") as relay:
        relay.users("add", "--uuid", "v", "--visitor-password", "s3cret")
        config = str(data / "provision" / "v.json")
        prov = load_provisioning(config)
        assert "visitors: checked" in relay.users("show", "v").out

        hidden = park(prov)
        refused = rendezvous("get", "v", "/", "--config", config)
        assert refused.code == 1 and "401" in refused.err and "--visitor-password" in refused.err
        for auth in ("digest", "basic"):
            served = answer_once(hidden, f"via {auth}\n".encode())
            got = rendezvous("get", "v", "/", "--config", config, "--auth", auth,
                             "--visitor-password", "s3cret")
            assert (got.code, got.out) == (0, f"via {auth}\n"), got.err
            served.join(5)
            hidden = park(prov)
        # From the environment: out of the process list.
        served = answer_once(hidden, b"via env\n")
        got = rendezvous("get", "v", "/", "--config", config,
                         env={"RENDEZVOUS_VISITOR_PASSWORD": "s3cret"})
        assert (got.code, got.out) == (0, "via env\n"), got.err
        served.join(5)
        hidden = park(prov)

        for auth in ("basic", "digest"):
            tunnel = subprocess.Popen(
                [sys.executable, "-m", "rendezvous", "open", "v", "--config", config,
                 "--listen", "127.0.0.1:0", "--auth", auth, "--visitor-password", "s3cret"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                assert tunnel.stdout is not None
                url = re.search(r"open (http://\S+) ", tunnel.stdout.readline().decode())
                assert url, "open printed no URL"
                served = answer_once(hidden, f"tunnel {auth}\n".encode())
                answer = requests.get(url.group(1) + "/", timeout=10)
                assert (answer.status_code, answer.text) == (200, f"tunnel {auth}\n")
                served.join(5)
                hidden = park(prov)
            finally:
                stop_process(tunnel)  # type: ignore[arg-type]
                if tunnel.stdout is not None:
                    tunnel.stdout.close()
        hidden.close()

        relay.users("visitor", "v", "--off")
        assert "visitors: not checked" in relay.users("show", "v").out


@contextmanager
def admin_page(tmp_path: Path, data: Path) -> Iterator[tuple[Relay, str, requests.Session]]:
    """A relay serving its admin page on loopback: (relay, the page's base URL, a session)."""
    admin_port = free_port()
    with serve(tmp_path, data, "--admin", f"127.0.0.1:{admin_port}") as relay:
        wait_for_port("127.0.0.1", admin_port, START_TIMEOUT, relay.proc)
        with requests.Session() as client:
            yield relay, f"http://127.0.0.1:{admin_port}", client


def test_the_admin_form_sets_a_visitor_password_and_8_digits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with admin_page(tmp_path, data) as (relay, base, client):
        page = client.get(base + "/", timeout=10)
        assert re.search(r'<option value="8" selected>', page.text), "8 digits by default"
        assert 'name="visitor_password"' in page.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        made = client.post(base + "/create", data={
            "csrf": csrf.group(1), "label": "door", "step": "30", "digits": "8",
            "visitor_password": "open sesame"}, allow_redirects=False, timeout=10)
        assert made.status_code == 303, made.text
        doc = client.get(base + made.headers["Location"].replace(
            "/entry", "/provisioning.json"), timeout=10).json()
        entry = client.get(base + made.headers["Location"], timeout=10).text
        assert re.search(r'id="visitors">checked: they log in as', entry)
        # The page's files point at this relay: its recorded host, the port it listens on.
        record = json.loads((data / "relay.json").read_text())
        assert (doc["server"]["host"], doc["server"]["port"]) == (record["host"], relay.port)
        assert doc["authParams"]["digits"] == 8
        shown = relay.users("show", doc["uuid"])
        assert "visitors: checked" in shown.out and "digits:   8" in shown.out


# ---------------------------------------------------------------------------- PROXY headers


def _header_for_visitor(relay: Relay, uuid: str, visitor: str) -> bytes:
    """The PROXY header the hidden server's local service (a ProxyHeaderService) got for one
    request by ``visitor`` (a 127.0.0.x source address) through the relay."""
    context = ssl.create_default_context(cafile=relay.data_dir / "cert.pem")
    transport = httpx.HTTPTransport(verify=context, local_address=visitor)
    with httpx.Client(transport=transport, timeout=10) as client:
        answer = client.get(f"https://127.0.0.1:{relay.port}/who", auth=(uuid, "x"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["request"] == "GET /who HTTP/1.1"
    return bytes.fromhex(answer.json()["header"])


def _agent_header(tmp_path: Path, relay: Relay, config: Path, service: ProxyHeaderService,
                  visitor: str, *flags: str) -> bytes:
    """Start ``rendezvous hidden`` from ``config`` (with ``flags``), visit once, stop it."""
    agent = AgentProcess(tmp_path / f"agent-{visitor}.log",
                         ["--config", str(config), "--forward", service.address, "--pool", "1",
                          *flags])
    try:
        agent.wait_for_log("parked", START_TIMEOUT)
        return _header_for_visitor(relay, "hub", visitor)
    finally:
        assert agent.terminate() == 0


def test_the_proxy_option_goes_from_users_add_through_the_file_to_the_local_service(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    service = ProxyHeaderService()
    try:
        with serve(tmp_path, data, "--server-host", "127.0.0.1") as relay:
            added = relay.users("add", "--uuid", "hub", "--proxy-protocol", "2")
            hub = data / "provision" / "hub.json"
            assert json.loads(hub.read_text())["proxyProtocol"] == 2
            assert "v2: each pairing reaches the local service after a PROXY header" in added.out
            assert "PROXY:    v2" in relay.users("show", "hub").out

            # The agent started from the file asks for it; the service learns the visitor.
            header = _agent_header(tmp_path, relay, hub, service, "127.0.0.21")
            assert header[:12] == V2_SIGNATURE
            source, destination, _, port = proxy_source(header)
            assert (source, destination, port) == ("127.0.0.21", "127.0.0.1", relay.port)
            # The agent's flag overrides the file: another version, or none.
            header = _agent_header(tmp_path, relay, hub, service, "127.0.0.22",
                                   "--proxy-protocol", "1")
            assert header.startswith(b"PROXY TCP4 127.0.0.22 127.0.0.1 ")
            assert proxy_source(header)[3] == relay.port

            # A rotation keeps it, whichever file it writes; --proxy-protocol 0 takes it away.
            elsewhere = tmp_path / "new-hub.json"
            relay.users("rotate", "hub", "--out", str(elsewhere))
            assert load_provisioning(elsewhere).proxy_protocol == 2
            relay.users("rotate", "hub", "--proxy-protocol", "0")
            assert "proxyProtocol" not in json.loads(hub.read_text())
            assert "PROXY:    none" in relay.users("show", "hub").out
            relay.users("rotate", "hub", "--proxy-protocol", "1")
            header = _agent_header(tmp_path, relay, hub, service, "127.0.0.23")
            assert header.startswith(b"PROXY TCP4 127.0.0.23 ")
    finally:
        service.close()


def test_a_bad_proxy_option_is_refused_everywhere(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for bad in ("3", "v2", ""):
        refused = rendezvous("users", "add", "--proxy-protocol", bad, "--data-dir", str(data))
        assert refused.code == 2 and "--proxy-protocol" in refused.err, refused.err
    assert not (data / "provision").exists()  # nothing was added
    made = ok("users", "add", "--uuid", "hub", "--proxy-protocol", "1", "--data-dir", str(data))
    assert "v1" in made.out
    refused = rendezvous("users", "rotate", "hub", "--proxy-protocol", "9", "--data-dir",
                         str(data))
    assert refused.code == 2 and "--proxy-protocol" in refused.err, refused.err
    assert load_provisioning(data / "provision" / "hub.json").proxy_protocol == 1
    # A file with a version the agent cannot ask for: a clear error, no start.
    broken = tmp_path / "broken.json"
    doc = json.loads((data / "provision" / "hub.json").read_text())
    broken.write_text(json.dumps({**doc, "proxyProtocol": 3}))
    started = rendezvous("hidden", "--config", str(broken), "--forward", "9")
    assert started.code == 2
    assert "proxyProtocol must be an integer from 0 to 2" in started.err, started.err


def test_the_admin_form_records_the_proxy_option(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with admin_page(tmp_path, data) as (relay, base, client):
        page = client.get(base + "/", timeout=10)
        assert re.search(r'<option value="0" selected>none</option>', page.text)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        for bad in ("3", "-1", "two"):
            refused = client.post(base + "/create", data={
                "csrf": csrf.group(1), "label": "bad", "proxy_protocol": bad},
                allow_redirects=False, timeout=10)
            assert refused.status_code == 400 and "proxy_protocol" in refused.text
        made = client.post(base + "/create", data={
            "csrf": csrf.group(1), "label": "door", "proxy_protocol": "2"},
            allow_redirects=False, timeout=10)
        assert made.status_code == 303, made.text
        doc = client.get(base + made.headers["Location"].replace(
            "/entry", "/provisioning.json"), timeout=10).json()
        assert doc["proxyProtocol"] == 2
        entry = client.get(base + made.headers["Location"], timeout=10).text
        assert re.search(r'id="proxy-protocol">v2: ', entry)
        # The page's rotation keeps it.
        rotated = client.post(base + "/rotate", data={"csrf": csrf.group(1),
                                                      "id": doc["uuid"]},
                              allow_redirects=False, timeout=10)
        assert rotated.status_code == 303, rotated.text
        again = client.get(base + "/provisioning.json", params={"id": doc["uuid"]},
                           timeout=10).json()
        assert again["proxyProtocol"] == 2
        assert again["authParams"]["base32"] != doc["authParams"]["base32"]
        assert [line for line in relay.users("list").out.splitlines() if "bad" in line] == []
        assert "PROXY:    v2" in relay.users("show", doc["uuid"]).out
