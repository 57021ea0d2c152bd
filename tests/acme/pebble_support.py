"""Debian's pebble (a real ACME server) with pebble-challtestsrv as its DNS (every name
resolves to 127.0.0.1); pebble validates TLS-ALPN-01 on ``tls_port``, where a test's relay
listens, and HTTP-01 on ``http_port`` (a relay's --acme-http listener)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import support
from harness import ServerThread
from support import free_port, stop_process, tail, wait_for_port

from rendezvous.server.certificates import CertificateManager
from rendezvous.tls import generate_self_signed

# The relay's main name in these tests; pebble's DNS resolves every name to 127.0.0.1.
MAIN_NAME = "relay.test"


@dataclass
class Pebble:
    directory: str
    ca_bundle: Path  # pebble's own HTTPS certificate (the directory's)
    root_pem: str  # the root pebble signs issued certificates with
    tls_port: int  # where pebble validates TLS-ALPN-01: the relay's port
    log: Path
    http_port: int  # where pebble validates HTTP-01: a test relay's --acme-http listener

    def orders(self) -> int:
        """How many new orders pebble has taken so far (from its log)."""
        return self.log.read_text(errors="replace").count("POST /order-plz")

    def accounts(self) -> int:
        """How many accounts were created at pebble so far."""
        return self.log.read_text(errors="replace").count("POST /sign-me-up")


def run_pebble(tmp_path: Path) -> Iterator[Pebble]:
    """A pebble of this test's own, on free ports (each test module's fixture)."""
    if shutil.which("pebble") is None:
        pytest.skip("Debian's pebble package is not installed")
    folder = tmp_path / "pebble"
    folder.mkdir()
    cert, key = folder / "cert.pem", folder / "key.pem"
    generate_self_signed(["localhost", "127.0.0.1"], cert, key)
    port, management, dns, dns_management = (free_port() for _ in range(4))
    tls_port, http_port = free_port(), free_port()
    config = folder / "pebble.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(cert), "privateKey": str(key),
        "httpPort": http_port, "tlsPort": tls_port,
        "ocspResponderURL": "", "externalAccountBindingRequired": False,
    }}))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    logs = [(folder / "dns.log").open("wb"), (folder / "pebble.log").open("wb")]
    dns_proc = subprocess.Popen(
        ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
         "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
         "-management", f"127.0.0.1:{dns_management}"], stdout=logs[0], stderr=subprocess.STDOUT)
    proc = subprocess.Popen(["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns}"],
                            env=env, stdout=logs[1], stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, timeout=10)
        wait_for_port("127.0.0.1", management, timeout=10)
        root = requests.get(f"https://127.0.0.1:{management}/roots/0", verify=str(cert),
                            timeout=5).text
        yield Pebble(f"https://127.0.0.1:{port}/dir", cert, root, tls_port, folder / "pebble.log",
                     http_port)
    except BaseException:
        print(tail(folder / "pebble.log"))
        raise
    finally:
        stop_process(proc)
        stop_process(dns_proc)
        for f in logs:
            f.close()




def fingerprint(port: int, name: str, root_pem: str | None = None) -> bytes:
    """The DER certificate presented to a real handshake for ``name`` at ``port`` (checked
    against pebble's root when given, else unchecked)."""
    if root_pem:
        context = ssl.create_default_context(cadata=root_pem)
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


class PebbleTrustingRelay(ServerThread):
    """A relay on its own loop whose clients (the tests' hidden servers) trust pebble's root
    and reach it by its main name; with the certificate manager's state at hand."""

    root_pem = ""

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.root_pem)

    def connect(self, timeout: float = 5.0, source: str | None = None) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return self.client_context().wrap_socket(raw, server_hostname=MAIN_NAME)

    @property
    def manager(self) -> CertificateManager:
        found = self.server.certificates
        assert found is not None
        return found

    def state(self, read: Callable[[CertificateManager], Any]) -> Any:
        """Read the certificate manager's state on the relay's loop."""
        return self.sync(lambda: read(self.manager))

    def served(self, host: str = MAIN_NAME) -> bytes:
        """The certificate a real handshake for ``host`` gets, checked against pebble's root."""
        return fingerprint(self.port, host, self.root_pem)

    def trusted(self, host: str = MAIN_NAME) -> bool:
        """Whether a handshake for ``host`` gets a certificate pebble issued for that name."""
        try:
            self.served(host)
        except ssl.SSLCertVerificationError:
            return False
        return True


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    support.wait_for(predicate, what, timeout, interval=0.1)  # (ACME steps take seconds)
