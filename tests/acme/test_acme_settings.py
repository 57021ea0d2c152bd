"""serve's ACME settings: what the command line makes of them, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rendezvous.cli import build_parser, main
from rendezvous.cli.serve import server_config
from rendezvous.config import DEFAULT_ACME_LOCK_TTL, DEFAULT_ACME_ORDERS_PER_HOUR, ServerConfig
from rendezvous.tls import generate_self_signed


def configured(tmp_path: Path, *argv: str) -> ServerConfig:
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path / "data"), *argv])
    return server_config(args, quiet=True)[0]


def test_defaults_and_settings(tmp_path: Path) -> None:
    config = configured(tmp_path, "--acme", "--public-host", "relay.test", "--domain",
                        "relay.test")
    assert config.acme is not None and config.domain == "relay.test"
    assert config.acme.orders_per_hour == DEFAULT_ACME_ORDERS_PER_HOUR
    assert config.acme.lock_ttl == DEFAULT_ACME_LOCK_TTL
    assert config.acme.wildcard is None
    config = configured(tmp_path, "--acme", "--public-host", "relay.test",
                        "--acme-orders-per-hour", "3", "--acme-lock-ttl", "12")
    assert config.acme is not None
    assert (config.acme.orders_per_hour, config.acme.lock_ttl) == (3, 12.0)


def test_a_wildcard_certificate_with_acme(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = tmp_path / "w.pem", tmp_path / "w.key"
    generate_self_signed(["*.relay.test"], cert, key)
    config = configured(tmp_path, "--acme", "--public-host", "relay.test", "--domain",
                        "relay.test", "--cert", str(cert), "--key", str(key))
    assert config.acme is not None and config.acme.wildcard is not None
    assert config.acme.wildcard.cert_file == cert
    assert config.tls is not None and config.tls.cert_file != cert  # the main one is ordered

    # Not a wildcard for the domain (or no domain): refused, saying why.
    other, other_key = tmp_path / "o.pem", tmp_path / "o.key"
    generate_self_signed(["relay.test"], other, other_key)
    for extra in (["--domain", "relay.test", "--cert", str(other), "--key", str(other_key)],
                  ["--cert", str(cert), "--key", str(key)]):
        assert main(["serve", "--data-dir", str(tmp_path / "data"), "--acme", "--public-host",
                     "relay.test", *extra]) == 2
        err = capsys.readouterr().err
        assert "wildcard certificate for *.DOMAIN" in err and "Traceback" not in err


def test_bad_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--acme-orders-per-hour", "0"], ["--acme-lock-ttl", "0"]):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["serve", "--acme", *argv])
        assert exited.value.code == 2
        assert argv[0] in capsys.readouterr().err
