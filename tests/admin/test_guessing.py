"""One throttle for every way of giving the admin password: the login form and /metrics'
Bearer and Basic share each address's allowance of wrong guesses (issue 11, item 3)."""

from __future__ import annotations

import base64
import http.client
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from admin_support import HTTP_TIMEOUT, admin_config, csrf_of, get, post
from harness import ServerThread, running_server

from rendezvous.admin import security

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def quick_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each wrong password costs a second; the throttle under test is the count, not the wait.
    monkeypatch.setattr(security, "LOGIN_FAILURE_DELAY", 0.01)


def metrics_from(s: ServerThread, authorization: str, source: str = "127.0.0.1"
                 ) -> http.client.HTTPResponse:
    """GET /metrics with ``authorization``, from the loopback address ``source``."""
    url = urlsplit(s.admin_url())
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=HTTP_TIMEOUT,
                                            source_address=(source, 0))
    connection.request("GET", "/metrics", headers={"Authorization": authorization})
    answer = connection.getresponse()
    answer.read()
    connection.close()
    return answer


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()


def login(s: ServerThread, client: requests.Session, password: str) -> requests.Response:
    base = s.admin_url()
    token = csrf_of(get(client, base + "/login").text)
    return post(client, base + "/login", {"csrf": token, "password": password, "next": "/"})


def test_guesses_through_metrics_get_429_after_a_few(tmp_path: Path) -> None:
    config = admin_config(tmp_path, password=PASSWORD, password_failures=3,
                          password_failure_interval=60.0)
    with running_server(tmp_path, admin=config) as s:
        for guess in ("Bearer one", basic("two"), "Bearer three"):
            assert metrics_from(s, guess).status == 401
        refused = metrics_from(s, "Bearer four")
        assert refused.status == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # From that address not even the right password is checked now: no oracle.
        assert metrics_from(s, f"Bearer {PASSWORD}").status == 429
        assert metrics_from(s, basic(PASSWORD)).status == 429
        # A scraper elsewhere is not affected, and a request without credentials costs nothing.
        assert metrics_from(s, f"Bearer {PASSWORD}", source="127.0.0.2").status == 200
        assert metrics_from(s, "", source="127.0.0.3").status == 401
        assert metrics_from(s, f"Bearer {PASSWORD}", source="127.0.0.3").status == 200


def test_the_login_form_and_metrics_share_the_budget(tmp_path: Path) -> None:
    config = admin_config(tmp_path, password=PASSWORD, password_failures=3)
    with running_server(tmp_path, admin=config) as s, requests.Session() as client:
        assert login(s, client, "wrong one").status_code == 401
        assert login(s, client, "wrong two").status_code == 401
        assert metrics_from(s, "Bearer wrong three").status == 401
        # The form is out of guesses too, right password or not.
        refused = login(s, client, PASSWORD)
        assert refused.status_code == 429 and "Too many wrong passwords" in refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert get(client, s.admin_url() + "/").status_code == 303  # still not logged in

    config = admin_config(tmp_path, password=PASSWORD, password_failures=3)
    with running_server(tmp_path, admin=config) as s, requests.Session() as client:
        assert metrics_from(s, "Bearer wrong one").status == 401
        assert metrics_from(s, basic("wrong two")).status == 401
        assert login(s, client, "wrong three").status_code == 401
        assert metrics_from(s, f"Bearer {PASSWORD}").status == 429
        assert login(s, client, PASSWORD).status_code == 429


def test_a_right_password_costs_nothing(tmp_path: Path) -> None:
    config = admin_config(tmp_path, password=PASSWORD, password_failures=2)
    with running_server(tmp_path, admin=config) as s, requests.Session() as client:
        for _ in range(10):
            assert metrics_from(s, f"Bearer {PASSWORD}").status == 200
        assert login(s, client, PASSWORD).status_code == 303
