"""Helpers for the admin page's tests: its settings, form tokens, raw parks with a file."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

import requests
from harness import PARKED, make_certificate, recv_exactly

from rendezvous.config import AdminConfig, RelayAddress
from rendezvous.protocol.totp import current_token
from rendezvous.provisioning import Provisioning
from rendezvous.tls import client_ssl_context, read_cert_pem

# Every request of these tests goes to 127.0.0.1 and answers at once; this only bounds a hang.
HTTP_TIMEOUT = 10.0
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def admin_config(tmp_path: Path, **settings: object) -> AdminConfig:
    """The admin page on a free loopback port; its files send hidden servers to the test relay
    on 127.0.0.1 (its own port) and pin the test certificate."""
    tls = make_certificate(tmp_path)
    relay = RelayAddress(host="127.0.0.1", port=None, ca_pem=read_cert_pem(tls.cert_file))
    options: dict[str, object] = {"host": "127.0.0.1", "port": 0, "relay": relay}
    options.update(settings)
    return AdminConfig(**options)  # type: ignore[arg-type]


def csrf_of(html: str) -> str:
    """The CSRF token in a page's forms."""
    found = _CSRF.search(html)
    assert found, "no csrf field in the page"
    return found.group(1)


def get(session: requests.Session, url: str, **kwargs: object) -> requests.Response:
    return session.get(url, allow_redirects=False, timeout=HTTP_TIMEOUT, **kwargs)  # type: ignore[arg-type]


def post(session: requests.Session, url: str, data: dict[str, str],
         **kwargs: object) -> requests.Response:
    return session.post(url, data=data, allow_redirects=False, timeout=HTTP_TIMEOUT,
                        **kwargs)  # type: ignore[arg-type]


def connect_as(prov: Provisioning, token: str | None = None) -> tuple[ssl.SSLSocket, bytes]:
    """Send a CONNECT the way a hidden server provisioned with ``prov`` does; the socket and
    the relay's answer (its first 16 bytes: ``HTTP/1.1 200\\r\\n\\r\\n`` when parked)."""
    raw = socket.create_connection((prov.host, prov.port), timeout=5.0)
    sock = client_ssl_context(prov.ca_pem).wrap_socket(raw, server_hostname=prov.host)
    token = token or current_token(prov.base32, prov.step, prov.digits)
    sock.sendall(f"CONNECT uuid:{prov.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
    return sock, recv_exactly(sock, len(PARKED))
