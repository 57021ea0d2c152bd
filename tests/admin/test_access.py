"""Who may use the admin page: loopback only without a password, a session for everything with
one, a CSRF token on every form post; and ``rendezvous admin`` on its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from admin_support import HTTP_TIMEOUT, admin_config, csrf_of, get, post
from harness import running_server
from support import free_port, stop_process, wait_for_port

from rendezvous.cli import main
from rendezvous.config import ENV_ADMIN_PASSWORD, AdminConfig
from rendezvous.errors import ConfigError
from rendezvous.registry import Entry

PASSWORD = "correct horse battery staple"


# ---------------------------------------------------------------------------- binding


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.10", "relay.example.com"])
def test_an_exposed_page_without_a_password_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match="open to the network"):
        AdminConfig(host=host, port=0)
    AdminConfig(host=host, port=0, password=PASSWORD)  # with one it may (nothing binds here)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.255.0.9", "::1", "[::1]",
                                  "localhost"])
def test_loopback_needs_no_password(host: str) -> None:
    AdminConfig(host=host, port=0)


def test_an_empty_password_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        AdminConfig(host="0.0.0.0", port=0, password="")


@pytest.mark.parametrize("argv", [
    ["admin", "--listen", "0.0.0.0:0", "--registry", "memory://"],
    ["serve", "--admin", "0.0.0.0:0", "--no-tls", "--port", "0", "--registry", "memory://"],
])
def test_the_commands_refuse_an_exposed_page_before_starting(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(ENV_ADMIN_PASSWORD, raising=False)
    data_dir = tmp_path / "data"
    assert main([*argv, "--data-dir", str(data_dir)]) == 2
    error = capsys.readouterr().err
    assert "open to the network" in error and ENV_ADMIN_PASSWORD in error
    assert not data_dir.exists()  # refused before anything was made


def test_a_page_on_another_loopback_address_serves(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path, host="127.0.0.2")) as s:
        url = s.admin_url()
        assert url.startswith("http://127.0.0.2:")
        with requests.Session() as client:
            assert get(client, url + "/").status_code == 200


# ---------------------------------------------------------------------------- with a password


def test_with_a_password_nothing_works_without_a_session(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path, password=PASSWORD)) as s:
        entry = s.add_entry()
        base = s.admin_url()
        ident = {"id": entry.uuid}
        with requests.Session() as client:
            # Pages send the browser to the login form; everything else is 401.
            for path in ("/", f"/entry?id={entry.uuid}",
                         f"/confirm?action=remove&id={entry.uuid}"):
                answer = get(client, base + path)
                assert answer.status_code == 303, path
                location = urlsplit(answer.headers["Location"])
                assert location.path == "/login", path
                assert parse_qs(location.query)["next"] == [path]
            for path in (f"/provisioning.json?id={entry.uuid}", f"/qr.svg?id={entry.uuid}",
                         "/api/status", "/metrics"):
                answer = get(client, base + path)
                assert answer.status_code == 401, path
                assert entry.base32 not in answer.text
            # Actions too, even with the login page's own form token.
            token = csrf_of(get(client, base + "/login").text)
            for path, form in (("/create", {"label": "intruder"}), ("/rotate", ident),
                               ("/remove", ident), ("/logout", {})):
                for data in (form, {**form, "csrf": token}):
                    assert post(client, base + path, data).status_code == 401, path
            assert s.call(s.registry.list()) == [entry]  # nothing changed

            # A wrong password is refused, and still opens nothing.
            answer = post(client, base + "/login", {"csrf": token, "password": "guess"})
            assert answer.status_code == 401
            assert "Wrong password" in answer.text
            assert get(client, base + "/api/status").status_code == 401

            # The right one opens everything, and goes where the browser was sent from.
            token = csrf_of(answer.text)
            answer = post(client, base + "/login",
                          {"csrf": token, "password": PASSWORD, "next": "/?from=login"})
            assert answer.status_code == 303 and answer.headers["Location"] == "/?from=login"
            page = get(client, base + "/")
            assert page.status_code == 200 and entry.uuid in page.text
            download = get(client, base + f"/provisioning.json?id={entry.uuid}")
            assert download.json()["authParams"]["base32"] == entry.base32

            # Logging out closes it again.
            answer = post(client, base + "/logout", {"csrf": csrf_of(page.text)})
            assert answer.status_code == 303
            assert get(client, base + "/").status_code == 303

        # Prometheus sends the password as a bearer token or with basic auth.
        metrics = base + "/metrics"
        bearer = requests.get(metrics, headers={"Authorization": f"Bearer {PASSWORD}"},
                              timeout=HTTP_TIMEOUT)
        assert bearer.status_code == 200 and "rendezvous_parked_connections" in bearer.text
        assert requests.get(metrics, auth=("prometheus", PASSWORD),
                            timeout=HTTP_TIMEOUT).status_code == 200
        wrong = requests.get(metrics, headers={"Authorization": "Bearer nope"},
                             timeout=HTTP_TIMEOUT)
        assert wrong.status_code == 401 and "Basic" in wrong.headers["WWW-Authenticate"]

        # Load balancers' probes need nothing.
        for path in ("/healthz", "/readyz"):
            assert requests.get(base + path, timeout=HTTP_TIMEOUT).status_code == 200


def test_login_never_redirects_off_the_site(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path, password=PASSWORD)) as s:
        base = s.admin_url()
        with requests.Session() as client:
            token = csrf_of(get(client, base + "/login").text)
            for target in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
                answer = post(client, base + "/login",
                              {"csrf": token, "password": PASSWORD, "next": target})
                assert answer.status_code == 303 and answer.headers["Location"] == "/"
                token = csrf_of(get(client, base + "/").text)


# ---------------------------------------------------------------------------- CSRF


def test_a_forged_post_is_refused(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path)) as s:
        entry = s.add_entry()
        base = s.admin_url()
        ident = {"id": entry.uuid}
        # Another site's form, posted by a browser that has no session here.
        with requests.Session() as stranger:
            assert post(stranger, base + "/remove", ident).status_code == 403
            assert post(stranger, base + "/create", {"label": "x"}).status_code == 403
        with requests.Session() as client:
            token = csrf_of(get(client, base + "/").text)
            # The operator's own browser, but the post lacks the token, or has a wrong one.
            for form in (ident, {**ident, "csrf": ""}, {**ident, "csrf": token[:-2] + "xx"}):
                answer = post(client, base + "/remove", form)
                assert answer.status_code == 403 and "token" in answer.text
            assert post(client, base + "/rotate", ident).status_code == 403
            # The right token from another origin.
            answer = post(client, base + "/remove", {**ident, "csrf": token},
                          headers={"Origin": "http://evil.example"})
            assert answer.status_code == 403
            assert s.call(s.registry.list()) == [entry]  # all refused

            answer = post(client, base + "/remove", {**ident, "csrf": token})
            assert answer.status_code == 303
            assert s.call(s.registry.list()) == []


def test_a_rebound_host_name_is_refused(tmp_path: Path) -> None:
    # A web page that points its own name at 127.0.0.1 must not read the page (and the token).
    with running_server(tmp_path, admin=admin_config(tmp_path)) as s:
        base = s.admin_url()
        answer = requests.get(base + "/", headers={"Host": "evil.example"}, timeout=HTTP_TIMEOUT)
        assert answer.status_code == 403
        assert requests.get(base + "/", headers={"Host": "localhost"},
                            timeout=HTTP_TIMEOUT).status_code == 200


def test_pages_carry_security_headers(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path)) as s:
        answer = requests.get(s.admin_url() + "/", timeout=HTTP_TIMEOUT)
        assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Cache-Control"] == "no-store"
        cookie = answer.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


# ---------------------------------------------------------------------------- alone


def test_the_admin_command_serves_the_registry_alone(tmp_path: Path) -> None:
    registry = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    env = {k: v for k, v in os.environ.items() if k != ENV_ADMIN_PASSWORD}
    assert main(["users", "add", "--label", "porch", "--registry", registry, "--json",
                 "--server-host", "relay.example.com", "--no-ca",
                 "--data-dir", str(tmp_path)]) == 0
    port = free_port()
    command = [sys.executable, "-m", "rendezvous", "admin", "--registry", registry,
               "--listen", f"127.0.0.1:{port}", "--server-host", "relay.example.com",
               "--data-dir", str(tmp_path)]
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, 15.0, proc)
        base = f"http://127.0.0.1:{port}"
        with requests.Session() as client:
            page = get(client, base + "/")
            assert page.status_code == 200
            assert "porch" in page.text and "Registry only" in page.text
            assert get(client, base + "/api/status").json()["relay"] is None
            token = csrf_of(page.text)
            answer = post(client, base + "/create", {"csrf": token, "label": "garage"})
            assert answer.status_code == 303
            document = get(client, base + answer.headers["Location"].replace(
                "/entry", "/provisioning.json")).json()
            # No relay has run with this data folder: its default port, and the certificate
            # it will present (made by the first command that needed it).
            assert document["server"] == {"host": "relay.example.com", "port": 8899,
                                          "ca": (tmp_path / "cert.pem").read_text()}
            Entry.from_record(document["uuid"], document)  # a well-formed record
        assert requests.get(base + "/readyz", timeout=HTTP_TIMEOUT).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            stop_process(proc)
            assert proc.stderr is not None
            proc.stderr.close()
