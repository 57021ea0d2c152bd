"""Named hidden servers on a real relay: https://NAME.relay.test/ with no credentials, every
header untouched; unknown names, visitor passwords, Host changes on one connection, and the
original's ways on the relay's own name, all through real curl and real sockets."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from harness import HiddenHTTPService, ServerThread
from named_support import DOMAIN, named_relay

from rendezvous.protocol.digest import VisitorSecret
from rendezvous.registry import Entry

pytestmark = pytest.mark.timeout(60)

CURL = shutil.which("curl")
CLIENT_TIMEOUT = 15


def curl(server: ServerThread, host: str, *args: str, path: str = "/") -> tuple[int, str]:
    """Run curl for https://HOST:PORT/PATH resolved to 127.0.0.1; (status, body)."""
    if CURL is None:
        pytest.fail("curl is missing")
    assert server.tls is not None
    url = f"https://{host}:{server.port}{path}"
    proc = subprocess.run(
        [CURL, "-sS", "--max-time", str(CLIENT_TIMEOUT), "--cacert", str(server.tls.cert_file),
         "--resolve", f"{host}:{server.port}:127.0.0.1", "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 5, check=False)
    assert proc.returncode == 0, proc.stderr
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), body


def named_entry(server: ServerThread, name: str, visitor_password: str = "") -> Entry:
    entry = server.add_entry()
    secret = VisitorSecret.from_password(entry.uuid, visitor_password) if visitor_password else None
    entry = replace(entry, name=name, visitor=secret)
    server.call(server.registry.replace(entry))
    return entry


def headers_of(body: str) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def test_a_named_host_needs_no_credentials_and_strips_nothing(tmp_path: Path) -> None:
    with named_relay(tmp_path, pair_wait=2.0) as server:
        entry = named_entry(server, "hub")
        with HiddenHTTPService(server, entry, parked=2) as hidden:
            status, body = curl(server, f"hub.{DOMAIN}", "-H", "Authorization: Bearer own-token",
                                "-H", "X-Extra: 1", path="/inside?x=1")
            assert status == 200, body
            seen = json.loads(body)
            assert seen["path"] == "/inside?x=1"
            headers = headers_of(body)
            # The hidden server's own authentication passes through untouched.
            assert headers["authorization"] == "Bearer own-token"
            assert headers["x-extra"] == "1"
            assert headers["host"] == f"hub.{DOMAIN}:{server.port}"
            # Case does not matter in a host name; Basic credentials are not the relay's either.
            status, body = curl(server, f"HUB.{DOMAIN.upper()}", "-u", "someone:secret")
            assert status == 200, body
            assert headers_of(body)["authorization"].startswith("Basic ")
        assert hidden.pairings >= 2


def test_an_unknown_name_gets_the_404_json(tmp_path: Path) -> None:
    with named_relay(tmp_path, pair_wait=0.3) as server:
        named_entry(server, "hub")
        status, body = curl(server, f"nobody.{DOMAIN}")
        assert status == 404
        assert json.loads(body)["error"]["diagnostic"] == "UUID not registered"
        # A named entry whose hidden server is not parked: the same 404, after pair_wait.
        status, body = curl(server, f"hub.{DOMAIN}")
        assert status == 404
        assert json.loads(body)["error"]["diagnostic"] == "UUID not registered"


def test_the_originals_ways_stay_on_the_relays_own_names(tmp_path: Path) -> None:
    with named_relay(tmp_path, pair_wait=2.0) as server:
        entry = named_entry(server, "hub")
        with HiddenHTTPService(server, entry, parked=2):
            # (a.hub.DOMAIN is two labels deep: not a name, and outside the wildcard, so it
            # goes as a Host header on a connection to DOMAIN.)
            for host, given in (("127.0.0.1", ()), (DOMAIN, ()),
                                (DOMAIN, ("-H", f"Host: a.hub.{DOMAIN}"))):
                status, body = curl(server, host, *given, "--digest", "-u", f"{entry.uuid}:x")
                assert status == 200, (host, body)
                assert "authorization" not in headers_of(body)  # stripped, as always
                status, body = curl(server, host, *given)
                assert status == 401, (host, body)  # no ID, not a name: the challenge
            status, body = curl(server, DOMAIN, "-H", "Upgrade: websocket", "-H",
                                "Connection: Upgrade", path=f"/?rendezvous={entry.uuid}")
            assert status == 200, body


def test_a_visitor_password_is_asked_on_named_hosts_too(tmp_path: Path) -> None:
    with named_relay(tmp_path, pair_wait=2.0) as server:
        entry = named_entry(server, "locked", visitor_password="pw")
        with HiddenHTTPService(server, entry, parked=2) as hidden:
            status, _ = curl(server, f"locked.{DOMAIN}")
            assert status == 401
            status, _ = curl(server, f"locked.{DOMAIN}", "--digest", "-u", f"{entry.uuid}:wrong")
            assert status == 401
            status, body = curl(server, f"locked.{DOMAIN}", "--digest", "-u",
                                f"{entry.uuid}:pw")
            assert status == 200, body
            assert headers_of(body)["authorization"].startswith("Digest ")
            status, body = curl(server, f"locked.{DOMAIN}", "--basic", "-u", f"{entry.uuid}:pw")
            assert status == 200, body
        assert [r.path for r in hidden.requests] == ["/", "/"]  # nothing unchecked got through


def test_later_requests_keep_to_their_host(tmp_path: Path) -> None:
    with named_relay(tmp_path, pair_wait=2.0, settle=0.0) as server:
        hub, other = named_entry(server, "hub"), named_entry(server, "other")
        with (HiddenHTTPService(server, hub, parked=1) as hub_side,
              HiddenHTTPService(server, other, parked=1) as other_side):
            context = ssl.create_default_context(cafile=str(server.tls.cert_file))  # type: ignore[union-attr]
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context,
                                               timeout=CLIENT_TIMEOUT)
            try:
                def get(host: str, path: str, **extra: str) -> tuple[int, dict[str, Any]]:
                    conn.request("GET", path, headers={"Host": host, **extra})
                    answer = conn.getresponse()
                    return answer.status, json.loads(answer.read())

                assert get(f"hub.{DOMAIN}", "/1")[1]["pairing"] == 1
                status, seen = get(f"hub.{DOMAIN}", "/2", Authorization="Basic eDp5")
                assert status == 200 and seen["pairing"] == 1  # the same pairing
                # Another Host ends the pairing; the request goes to its own hidden server.
                status, seen = get(f"other.{DOMAIN}", "/3")
                assert status == 200 and seen["path"] == "/3"
                # And the relay's own name, naming no ID: the challenge, not another's server.
                conn.request("GET", "/4", headers={"Host": DOMAIN})
                answer = conn.getresponse()
                answer.read()
                assert answer.status == 401
            finally:
                conn.close()
        assert [r.path for r in hub_side.requests] == ["/1", "/2"]
        assert [r.path for r in other_side.requests] == ["/3"]
        assert hub_side.requests[1].header("Authorization") == "Basic eDp5"


def test_a_host_other_than_the_sni_gets_421_and_the_connection_goes_on(tmp_path: Path) -> None:
    """SNI hub.D and Host other.D (or D itself): 421 Misdirected Request, the connection kept
    for hub.D; with no SNI (an IP) the Host alone routes (test above)."""
    with named_relay(tmp_path, pair_wait=2.0, settle=0.0) as server:
        hub, other = named_entry(server, "hub"), named_entry(server, "other")
        with (HiddenHTTPService(server, hub, parked=1) as hub_side,
              HiddenHTTPService(server, other, parked=1) as other_side):
            status, body = curl(server, f"hub.{DOMAIN}", "-H", f"Host: other.{DOMAIN}")
            assert status == 421, body
            assert "TLS server name" in json.loads(body)["error"]["diagnostic"]

            context = ssl.create_default_context(cafile=str(server.tls.cert_file))  # type: ignore[union-attr]
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT)
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT)
            conn.sock = context.wrap_socket(raw, server_hostname=f"hub.{DOMAIN}")
            try:
                def get(host: str, path: str) -> tuple[int, bytes]:
                    conn.request("GET", path, headers={"Host": host})
                    answer = conn.getresponse()
                    return answer.status, answer.read()

                assert get(f"hub.{DOMAIN}", "/1")[0] == 200
                for host in (f"other.{DOMAIN}", DOMAIN, f"HUB.{DOMAIN}.evil"):
                    status, _ = get(host, "/x")
                    assert status == 421, host
                status, seen = get(f"Hub.{DOMAIN}:{server.port}", "/2")  # the same host
                assert status == 200 and json.loads(seen)["path"] == "/2"
            finally:
                conn.close()
        assert [r.path for r in hub_side.requests] == ["/1", "/2"]
        assert other_side.requests == []
