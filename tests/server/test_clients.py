"""Real mobile clients (curl, requests, httpx) reach a hidden HTTP server through the relay.

Each test starts a real server (TLS on 127.0.0.1) and a :class:`HiddenHTTPService` keeping
connections parked for one ID; the client names the ID as its Digest or Basic user name, exactly
as docs/protocol.md §2 says a stock client does.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import requests
from harness import HiddenHTTPService, ServerThread, running_server
from requests.auth import HTTPBasicAuth, HTTPDigestAuth

from rendezvous.registry import Entry

pytestmark = pytest.mark.timeout(60)

CURL = shutil.which("curl")
CLIENT_TIMEOUT = 15.0


@dataclass
class Setup:
    server: ServerThread
    entry: Entry
    hidden: HiddenHTTPService

    @property
    def cert(self) -> str:
        assert self.server.tls is not None
        return str(self.server.tls.cert_file)

    def url(self, path: str) -> str:
        return self.server.url() + path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with running_server(tmp_path, pair_wait=2.0) as server:
        entry = server.add_entry()
        with HiddenHTTPService(server, entry, parked=2) as hidden:
            yield Setup(server, entry, hidden)


def header_names(document: dict[str, object]) -> list[str]:
    headers = document["headers"]
    assert isinstance(headers, list)
    return [str(name).lower() for name, _ in headers]


def assert_no_authorization_seen(hidden: HiddenHTTPService) -> None:
    """The relay strips ``Authorization`` from every request it passes on, the later ones on
    a paired connection included (docs/protocol.md §2)."""
    assert hidden.requests, "the hidden server saw no request"
    for request in hidden.requests:
        assert request.header("Authorization") is None, request


# curl -----------------------------------------------------------------------------------


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
@pytest.mark.parametrize("scheme", ["--digest", "--basic"])
def test_curl_reaches_the_hidden_server(setup: Setup, scheme: str) -> None:
    assert CURL is not None
    args = [CURL, "--silent", "--show-error", "--fail", "--max-time", str(CLIENT_TIMEOUT),
            scheme, "-u", f"{setup.entry.uuid}:x", "--cacert", setup.cert,
            setup.url("/curl/path?q=1")]
    done = subprocess.run(args, capture_output=True, timeout=CLIENT_TIMEOUT + 5, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    document = json.loads(done.stdout)
    assert document["method"] == "GET"
    assert document["path"] == "/curl/path?q=1"
    names = header_names(document)
    assert "authorization" not in names
    assert "host" in names and "user-agent" in names
    assert_no_authorization_seen(setup.hidden)


# requests -------------------------------------------------------------------------------


def test_requests_with_digest_auth(setup: Setup) -> None:
    with requests.Session() as session:
        response = session.get(setup.url("/requests?x=%2F"), verify=setup.cert,
                               auth=HTTPDigestAuth(setup.entry.uuid, "x"),
                               timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["path"] == "/requests?x=%2F"
    assert "authorization" not in header_names(document)
    assert [r.status_code for r in response.history] == [401]  # the relay's challenge
    assert_no_authorization_seen(setup.hidden)


def test_requests_uploads_ten_mebibytes_whole(setup: Setup) -> None:
    payload = random.Random(10).randbytes(10 << 20)
    with requests.Session() as session:
        response = session.post(setup.url("/upload"), data=payload, verify=setup.cert,
                                auth=HTTPDigestAuth(setup.entry.uuid, "x"),
                                timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json() == {"length": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest()}
    assert_no_authorization_seen(setup.hidden)


def test_requests_chunked_upload_with_basic_auth(setup: Setup) -> None:
    chunks = [random.Random(n).randbytes(100_000 + n) for n in range(20)]
    with requests.Session() as session:
        response = session.put(setup.url("/chunked"), data=iter(chunks), verify=setup.cert,
                               auth=HTTPBasicAuth(setup.entry.uuid, "x"),
                               timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200, response.text
    body = b"".join(chunks)
    assert response.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (request,) = setup.hidden.requests
    assert request.header("Transfer-Encoding") == "chunked"
    assert_no_authorization_seen(setup.hidden)


# httpx ----------------------------------------------------------------------------------


def test_httpx_with_digest_auth(setup: Setup) -> None:
    context = setup.server.client_context()
    with httpx.Client(verify=context, timeout=CLIENT_TIMEOUT,
                      auth=httpx.DigestAuth(setup.entry.uuid, "x")) as client:
        response = client.get(setup.url("/httpx"))
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "/httpx"
    assert "authorization" not in header_names(response.json())
    assert_no_authorization_seen(setup.hidden)


def test_httpx_follows_a_redirect_chain_on_one_client(setup: Setup) -> None:
    context = setup.server.client_context()
    with httpx.Client(verify=context, timeout=CLIENT_TIMEOUT, follow_redirects=True,
                      auth=httpx.DigestAuth(setup.entry.uuid, "x")) as client:
        response = client.get(setup.url("/redirect/5"))
        assert response.status_code == 200, response.text
        assert response.json()["path"] == "/redirect/0"
        redirects = [r.status_code for r in response.history if r.status_code != 401]
        assert redirects == [302] * 5
        # The same client keeps working afterwards (on its paired connection or a new one).
        again = client.get(setup.url("/after"))
        assert again.status_code == 200, again.text
        assert again.json()["path"] == "/after"
    paths = [request.path for request in setup.hidden.requests]
    assert paths == [f"/redirect/{n}" for n in range(5, -1, -1)] + ["/after"]
    assert_no_authorization_seen(setup.hidden)


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_curl_digest_upload_with_expect_continue(setup: Setup, tmp_path: Path) -> None:
    """curl --digest POSTs an empty body first, then the real one with ``Expect: 100-continue``
    after the challenge; the hidden server's ``100 Continue`` must reach curl through the relay."""
    assert CURL is not None
    payload = random.Random(11).randbytes(3 << 20)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    args = [CURL, "--silent", "--show-error", "--fail", "--max-time", str(CLIENT_TIMEOUT),
            "--digest", "-u", f"{setup.entry.uuid}:x", "--cacert", setup.cert,
            "--data-binary", f"@{upload}", "-H", "Content-Type: application/octet-stream",
            setup.url("/curl-upload")]
    done = subprocess.run(args, capture_output=True, timeout=CLIENT_TIMEOUT + 5, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert json.loads(done.stdout) == {"length": len(payload),
                                       "sha256": hashlib.sha256(payload).hexdigest()}
    (request,) = setup.hidden.requests
    assert request.header("Expect") == "100-continue"
    assert_no_authorization_seen(setup.hidden)
