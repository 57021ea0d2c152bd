"""serve --acme --domain: one certificate per named entry, ordered from pebble by TLS-ALPN-01 as
names come (never for an SNI no entry has), dropped as they go, within the orders-per-hour
limit; names created while the relay was down are ordered at start."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from harness import HiddenHTTPService
from pebble_support import (
    MAIN_NAME,
    Pebble,
    PebbleTrustingRelay,
    fingerprint,
    run_pebble,
    wait_for,
)

from rendezvous.config import AcmeConfig, Limits, ServerConfig, TLSConfig
from rendezvous.registry import Entry, new_secret, open_registry
from rendezvous.tls import ensure_self_signed, generate_self_signed

DOMAIN = MAIN_NAME
# The "hour" of the orders-per-hour limit here: long enough that a name added right after the
# main certificate's order certainly falls inside it, short enough for the suite.
WINDOW = 8.0


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    yield from run_pebble(tmp_path)



class NamedAcmeRelay(PebbleTrustingRelay):
    """A relay whose hidden servers trust pebble's root and park by the relay's main name."""


def start_relay(pebble: Pebble, data_dir: Path, registry_url: str,
                **acme: Any) -> NamedAcmeRelay:
    config = ServerConfig(
        host="127.0.0.1", port=pebble.tls_port, registry_url=registry_url, data_dir=data_dir,
        tls=ensure_self_signed(data_dir, [DOMAIN]), domain=DOMAIN,
        limits=replace(Limits(), registry_poll=0.2),
        acme=AcmeConfig(names=(DOMAIN,), directory=pebble.directory, ca_bundle=pebble.ca_bundle,
                        retry_first=1.0, order_timeout=20.0, **acme))
    NamedAcmeRelay.root_pem = pebble.root_pem
    return NamedAcmeRelay(config)


def trusted(port: int, host: str, root_pem: str) -> bool:
    """Whether a handshake for ``host`` gets a certificate pebble issued for that name."""
    try:
        fingerprint(port, host, root_pem)
    except ssl.SSLCertVerificationError:
        return False
    return True


def named(name: str) -> Entry:
    return Entry(uuid=f"named-{name}-{time.monotonic_ns()}", base32=new_secret(), name=name)


def logged(caplog: pytest.LogCaptureFixture, event: str, **fields: str) -> int:
    """How many times the relay logged ``event`` with these fields."""
    return sum(1 for r in caplog.records if r.getMessage() == event
               and all(getattr(r, "event_fields", {}).get(k) == v for k, v in fields.items()))


def test_certificate_per_name_ordered_served_dropped_and_limited(
        pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    data_dir = tmp_path / "data"
    names_dir = data_dir / "acme" / "names"
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root_pem)
    server = start_relay(pebble, data_dir, registry_url, orders_per_hour=2, orders_window=WINDOW)
    try:
        port = server.port
        wait_for(lambda: trusted(port, DOMAIN, pebble.root_pem), "the main certificate")
        main = fingerprint(port, DOMAIN)

        # An SNI that is no registered name gets the main certificate and orders nothing.
        assert fingerprint(port, f"unknown.{DOMAIN}") == main

        # Two names at once: the first is ordered, the second is past the limit (the main
        # certificate's order and hub's fill it) and waits for the window to move on.
        hub, later = named("hub"), named("later")
        server.call(server.registry.add(hub))
        server.call(server.registry.add(later))
        wait_for(lambda: trusted(port, f"hub.{DOMAIN}", pebble.root_pem), "hub's certificate")
        wait_for(lambda: server.state(lambda m: m.held) == [f"later.{DOMAIN}"],
                 "the limit holding later back")
        assert not trusted(port, f"later.{DOMAIN}", pebble.root_pem)
        assert (names_dir / f"hub.{DOMAIN}" / "key.pem").stat().st_mode & 0o777 == 0o600

        # curl trusting only pebble's root reaches the hidden server by its name, with its
        # own Authorization header untouched.
        with HiddenHTTPService(server, hub) as service:
            out = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", str(root), "--resolve",
                 f"hub.{DOMAIN}:{port}:127.0.0.1", "-H", "Authorization: Bearer own",
                 f"https://hub.{DOMAIN}:{port}/named"],
                capture_output=True, timeout=20, check=True)
            answer = json.loads(out.stdout)
            assert answer["path"] == "/named"
            assert ["Authorization", "Bearer own"] in answer["headers"]
        assert service.errors == []

        wait_for(lambda: trusted(port, f"later.{DOMAIN}", pebble.root_pem),
                 "later's certificate once the window moved on", timeout=WINDOW + 30)
        assert server.state(lambda m: m.ordered) == ["main", f"hub.{DOMAIN}", f"later.{DOMAIN}"]
        # Each said once, however many handshakes and schedule rounds met them.
        assert logged(caplog, "acme orders per hour reached: this name waits",
                      name=f"later.{DOMAIN}") == 1
        assert logged(caplog, "no certificate for this name yet: its visitors get the main "
                      "certificate (browsers warn) until it is in", name=f"later.{DOMAIN}") == 1

        # Renamed away: hub's certificate is gone (file and context), two's comes.
        server.call(server.registry.replace(replace(hub, name="two")))
        wait_for(lambda: trusted(port, f"two.{DOMAIN}", pebble.root_pem), "two's certificate",
                 timeout=WINDOW + 30)
        assert not (names_dir / f"hub.{DOMAIN}").exists()
        assert fingerprint(port, f"hub.{DOMAIN}") == main

        # Removed: its certificate is gone.
        server.call(server.registry.remove(later.uuid))
        wait_for(lambda: not (names_dir / f"later.{DOMAIN}").exists(), "later's removal")
        assert fingerprint(port, f"later.{DOMAIN}") == main
        assert fingerprint(port, f"unknown.{DOMAIN}") == main
        assert f"unknown.{DOMAIN}" not in server.state(lambda m: list(m.slots))
        two = fingerprint(port, f"two.{DOMAIN}")
        assert pebble.orders() == 4  # main, hub, later, two: none for unknown
    finally:
        server.stop()

    # While the relay is down a name is created: at start it is ordered, and the stored
    # certificates are reused.
    async def add_late() -> None:
        registry = open_registry(registry_url)
        try:
            await registry.add(named("late"))
        finally:
            await registry.close()

    asyncio.run(add_late())
    again = start_relay(pebble, data_dir, registry_url)
    try:
        wait_for(lambda: trusted(again.port, f"late.{DOMAIN}", pebble.root_pem),
                 "late's certificate")
        assert fingerprint(again.port, f"two.{DOMAIN}", pebble.root_pem) == two
        assert fingerprint(again.port, DOMAIN, pebble.root_pem) == main
        assert again.state(lambda m: m.ordered) == [f"late.{DOMAIN}"]
        assert pebble.orders() == 5

        # `users add --name` in another process: the registry's watch brings the name.
        subprocess.run([sys.executable, "-m", "rendezvous", "users", "add", "--name", "cli",
                        "--registry", registry_url, "--data-dir", str(data_dir), "--out",
                        str(tmp_path / "cli.json")], capture_output=True, timeout=30, check=True)
        wait_for(lambda: trusted(again.port, f"cli.{DOMAIN}", pebble.root_pem),
                 "the certificate of a name added by the CLI")
        assert pebble.orders() == 6

        # A name's certificate is renewed like the main one (here: forced).
        late = fingerprint(again.port, f"late.{DOMAIN}")
        again.sync(again.manager.renew_now, f"late.{DOMAIN}")
        wait_for(lambda: fingerprint(again.port, f"late.{DOMAIN}") != late, "late's renewal")
        assert trusted(again.port, f"late.{DOMAIN}", pebble.root_pem)
        assert pebble.orders() == 7
    finally:
        again.stop()


def test_a_wildcard_certificate_of_the_operator_wins(pebble: Pebble, tmp_path: Path) -> None:
    """--acme with --cert/--key for *.DOMAIN: the relay's own name gets pebble's certificate,
    named hosts the wildcard, and no certificate per name is ordered."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cert, key = tmp_path / "wildcard.pem", tmp_path / "wildcard.key"
    generate_self_signed([f"*.{DOMAIN}"], cert, key)
    wildcard = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    server = start_relay(pebble, data_dir, "memory://",
                         wildcard=TLSConfig(cert_file=cert, key_file=key))
    try:
        wait_for(lambda: trusted(server.port, DOMAIN, pebble.root_pem), "the main certificate")
        server.call(server.registry.add(named("hub")))
        assert fingerprint(server.port, f"hub.{DOMAIN}") == wildcard
        assert fingerprint(server.port, f"unknown.{DOMAIN}") == wildcard
        time.sleep(1.0)  # (registry_poll is 0.2 s: a per-name order would have begun)
        assert server.state(lambda m: m.ordered) == ["main"]
        assert pebble.orders() == 1
        assert not (data_dir / "acme" / "names").exists()

        # SIGHUP's reload keeps the ACME certificate (it does not fall back to the files).
        main = fingerprint(server.port, DOMAIN, pebble.root_pem)
        assert server.sync(server.server.reload_tls) == "kept (ACME)"
        assert fingerprint(server.port, DOMAIN, pebble.root_pem) == main
        assert fingerprint(server.port, f"hub.{DOMAIN}") == wildcard
    finally:
        server.stop()
