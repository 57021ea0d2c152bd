"""The ``rendezvous`` command, run as a real process against real files and a real registry."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import free_port

from rendezvous import __version__
from rendezvous.provisioning import load_provisioning
from rendezvous.tls import cert_names, default_names, generate_self_signed, is_self_signed

# Generous: a cold interpreter start on a loaded 2-core machine.
RUN_TIMEOUT = 60.0
# An unreachable registry must be reported quickly, not after the backends' long timeouts.
UNREACHABLE_WITHIN = 8.0


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def rendezvous(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Result:
    """Run ``python -m rendezvous ARGS`` in ``cwd`` with no RENDEZVOUS_* variables but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "rendezvous", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(result: Result) -> Result:
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    return result


def failed(result: Result, message: str) -> Result:
    """Assert a clean failure: status 2 and one ``rendezvous: error:`` line containing message."""
    assert result.code == 2, (result.out, result.err)
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert lines[-1].startswith("rendezvous: error: "), result.err
    assert message in lines[-1]
    return result


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["users"],
        ["users", "add"],
        ["users", "list"],
        ["users", "show"],
        ["users", "rotate"],
        ["users", "remove"],
        ["cert"],
    ],
)
def test_help(tmp_path: Path, command: list[str]) -> None:
    result = ok(rendezvous(*command, "--help", cwd=tmp_path))
    assert result.out.startswith(f"usage: rendezvous {' '.join(command)}".rstrip())


def test_help_shows_defaults(tmp_path: Path) -> None:
    serve = ok(rendezvous("serve", "--help", cwd=tmp_path)).out
    for text in ("8899", "0.0.0.0", "RENDEZVOUS_DATA_DIR", "RENDEZVOUS_REGISTRY", "--no-uvloop"):
        assert text in serve
    add = ok(rendezvous("users", "add", "--help", cwd=tmp_path)).out
    assert "Exit status" in add


def test_version_and_no_command(tmp_path: Path) -> None:
    assert ok(rendezvous("--version", cwd=tmp_path)).out.strip() == f"rendezvous {__version__}"
    result = rendezvous(cwd=tmp_path)
    assert result.code == 2
    assert "usage: rendezvous" in result.err


def test_users_lifecycle_on_sqlite(tmp_path: Path) -> None:
    data = tmp_path / "data"
    common = ["--data-dir", str(data)]

    added = ok(
        rendezvous(
            "users", "add", "--uuid", "hub-1", "--label", "living room", "--digits", "8",
            "--step", "60", "--server-host", "relay.example.com", "--server-port", "443",
            *common, cwd=tmp_path,
        )
    )  # fmt: skip
    path = data / "provision" / "hub-1.json"
    assert str(path) in added.out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = load_provisioning(path)
    assert (first.uuid, first.label, first.host, first.port) == (
        "hub-1",
        "living room",
        "relay.example.com",
        443,
    )
    assert (first.step, first.digits) == (60, 8)
    # Before the relay's first start the certificate is made the way the relay would make it
    # (its names and the public host given), so the file carries the CA the relay will present.
    assert first.ca_pem == (data / "cert.pem").read_text()
    assert "relay.example.com" in cert_names((data / "cert.pem").read_bytes())
    assert "made now" in added.out
    assert (data / "registry.sqlite3").is_file()

    ok(rendezvous("users", "add", "--label", "second", *common, cwd=tmp_path))

    table = ok(rendezvous("users", "list", *common, cwd=tmp_path)).out.splitlines()
    assert table[0].split() == ["ID", "LABEL", "CREATED"]
    assert table[1].startswith("hub-1") and "living room" in table[1]
    assert "second" in table[2]
    assert len(table) == 3

    listed = ok(rendezvous("users", "list", "--json", *common, cwd=tmp_path)).json()
    assert listed[0]["uuid"] == "hub-1"
    assert [e["label"] for e in listed] == ["living room", "second"]
    assert "base32" not in json.dumps(listed)

    shown = ok(rendezvous("users", "show", "hub-1", *common, cwd=tmp_path)).out
    assert "living room" in shown
    assert first.base32 not in shown
    secret = ok(rendezvous("users", "show", "hub-1", "--secret", "--json", *common, cwd=tmp_path))
    assert secret.json()["authParams"] == {"base32": first.base32, "step": 60, "digits": 8}

    rotated = ok(
        rendezvous(
            "users", "rotate", "hub-1", "--server-host", "relay.example.com", *common,
            cwd=tmp_path,
        )
    )  # fmt: skip
    assert str(path) in rotated.out
    second = load_provisioning(path)
    assert second.base32 != first.base32
    assert (second.label, second.step, second.digits) == ("living room", 60, 8)
    now = ok(rendezvous("users", "show", "hub-1", "--secret", "--json", *common, cwd=tmp_path))
    assert now.json()["authParams"]["base32"] == second.base32

    removed = ok(rendezvous("users", "remove", "hub-1", *common, cwd=tmp_path))
    assert "hub-1" in removed.out
    left = ok(rendezvous("users", "list", "--json", *common, cwd=tmp_path)).json()
    assert [e["label"] for e in left] == ["second"]


def test_unknown_id_is_a_clean_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'reg.sqlite3'}"
    ok(rendezvous("users", "add", "--registry", url, "--json", cwd=tmp_path))
    for action in ("show", "rotate", "remove"):
        result = rendezvous("users", action, "nope", "--registry", url, cwd=tmp_path)
        failed(result, "no hidden server with ID 'nope'")
        assert result.out == ""


def test_duplicate_and_invalid_ids(tmp_path: Path) -> None:
    ok(rendezvous("users", "add", "--uuid", "dup", cwd=tmp_path))
    before = (tmp_path / "data" / "provision" / "dup.json").read_text()
    failed(rendezvous("users", "add", "--uuid", "dup", cwd=tmp_path), "already exists")
    # The existing hidden server's file keeps its secret.
    assert (tmp_path / "data" / "provision" / "dup.json").read_text() == before
    failed(rendezvous("users", "add", "--uuid", "a/b", cwd=tmp_path), "invalid ID")
    bad_digits = rendezvous("users", "add", "--digits", "5", cwd=tmp_path)
    assert bad_digits.code == 2
    assert "invalid choice" in bad_digits.err


def test_json_prints_instead_of_writing(tmp_path: Path) -> None:
    result = ok(rendezvous("users", "add", "--uuid", "j", "--label", "L", "--json", cwd=tmp_path))
    doc = result.json()
    assert doc["uuid"] == "j"
    assert set(doc) == {"uuid", "label", "server", "authParams"}
    assert doc["server"]["port"] == 8899
    assert not (tmp_path / "data" / "provision").exists()

    out = tmp_path / "elsewhere" / "j2.json"
    both = ok(rendezvous("users", "add", "--uuid", "j2", "--json", "--out", str(out), cwd=tmp_path))
    assert both.json() == json.loads(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_failed_write_leaves_no_entry(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = rendezvous(
        "users", "add", "--uuid", "w", "--out", str(blocker / "x.json"), cwd=tmp_path
    )
    failed(result, "cannot write provisioning file")
    listed = ok(rendezvous("users", "list", "--json", cwd=tmp_path)).json()
    assert listed == []

    ok(rendezvous("users", "add", "--uuid", "r", cwd=tmp_path))
    secret = load_provisioning(tmp_path / "data" / "provision" / "r.json").base32
    result = rendezvous("users", "rotate", "r", "--out", str(blocker / "x.json"), cwd=tmp_path)
    failed(result, "cannot write provisioning file")
    shown = ok(rendezvous("users", "show", "r", "--secret", "--json", cwd=tmp_path)).json()
    assert shown["authParams"]["base32"] == secret  # the rotation was taken back


def test_users_on_redis(tmp_path: Path, redis_registry_url: str) -> None:
    url = redis_registry_url
    added = ok(
        rendezvous("users", "add", "--label", "r", "--json", "--registry", url, cwd=tmp_path)
    )
    uuid = added.json()["uuid"]
    listed = ok(rendezvous("users", "list", "--json", "--registry", url, cwd=tmp_path)).json()
    assert [e["uuid"] for e in listed] == [uuid]
    ok(rendezvous("users", "remove", uuid, "--registry", url, cwd=tmp_path))
    failed(rendezvous("users", "show", uuid, "--registry", url, cwd=tmp_path), "no hidden server")


def test_self_signed_certificate_goes_into_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    generate_self_signed(
        [*default_names(), "relay.example.com"], data / "cert.pem", data / "key.pem"
    )
    doc = ok(rendezvous("users", "add", "--json", cwd=tmp_path)).json()
    assert doc["server"]["ca"] == (data / "cert.pem").read_text()
    assert is_self_signed(doc["server"]["ca"].encode())
    # The first name the operator added to the certificate, not localhost.
    assert doc["server"]["host"] == "relay.example.com"

    no_ca = ok(rendezvous("users", "add", "--json", "--no-ca", cwd=tmp_path)).json()
    assert "ca" not in no_ca["server"]

    other = tmp_path / "other"
    other.mkdir()
    generate_self_signed(["ca.example"], other / "cert.pem", other / "key.pem")
    chosen = ok(
        rendezvous("users", "add", "--json", "--ca", str(other / "cert.pem"), cwd=tmp_path)
    ).json()
    assert chosen["server"]["ca"] == (other / "cert.pem").read_text()

    clash = rendezvous("users", "add", "--ca", "x.pem", "--no-ca", cwd=tmp_path)
    assert clash.code == 2
    assert "not allowed with" in clash.err


def test_environment_chooses_the_data_dir(tmp_path: Path) -> None:
    env = {"RENDEZVOUS_DATA_DIR": str(tmp_path / "envdata")}
    ok(rendezvous("users", "add", "--uuid", "e", cwd=tmp_path, env=env))
    assert (tmp_path / "envdata" / "provision" / "e.json").is_file()
    assert (tmp_path / "envdata" / "registry.sqlite3").is_file()
    listed = ok(rendezvous("users", "list", "--json", cwd=tmp_path, env=env)).json()
    assert [e["uuid"] for e in listed] == ["e"]


def test_missing_data_dir_is_explained(tmp_path: Path) -> None:
    result = rendezvous("users", "list", "--data-dir", str(tmp_path / "typo"), cwd=tmp_path)
    failed(result, "does not exist")
    assert not (tmp_path / "typo").exists()


def test_unreachable_redis_is_clear_and_quick(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for command in (["list"], ["add", "--json"], ["show", "x"]):
        started = time.monotonic()
        result = rendezvous("users", *command, "--registry", url, cwd=tmp_path)
        assert time.monotonic() - started < UNREACHABLE_WITHIN
        failed(result, f"registry {url} unreachable")
        assert len(result.err.strip().splitlines()) == 1


def test_unknown_registry_scheme(tmp_path: Path) -> None:
    failed(rendezvous("users", "list", "--registry", "ftp://x", cwd=tmp_path), "unknown registry")


def test_cert_command(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = ok(
        rendezvous(
            "cert", "--host", "relay.example.com", "--host", "203.0.113.7", "--out-dir", str(out),
            "--days", "30", cwd=tmp_path,
        )
    )  # fmt: skip
    cert, key = out / "cert.pem", out / "key.pem"
    assert str(cert) in result.out and str(key) in result.out
    assert "relay.example.com, 203.0.113.7" in result.out
    assert cert_names(cert.read_bytes()) == ["relay.example.com", "203.0.113.7"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    before = key.read_bytes()
    again = rendezvous("cert", "--host", "x.example", "--out-dir", str(out), cwd=tmp_path)
    failed(again, "--force")
    assert key.read_bytes() == before
    ok(rendezvous("cert", "--host", "x.example", "--out-dir", str(out), "--force", cwd=tmp_path))
    assert cert_names(cert.read_bytes()) == ["x.example"]

    fresh = tmp_path / "fresh"
    bad = rendezvous("cert", "--host", "bad name", "--out-dir", str(fresh), cwd=tmp_path)
    failed(bad, "invalid host name for a certificate: 'bad name'")
    assert not (fresh / "key.pem").exists()
    missing = rendezvous("cert", "--out-dir", str(out), cwd=tmp_path)
    assert missing.code == 2
    assert "--host" in missing.err


@pytest.mark.parametrize(("flags", "message"), [
    (["--cluster-routes", "-1"], "argument --cluster-routes: must be at least 0, not -1"),
    (["--cluster-window", "1000"],
     "argument --cluster-window: must be from 16384 to 1073741824, not 1000"),
    (["--cluster-link-timeout", "0"],
     "argument --cluster-link-timeout: must be more than 0 seconds"),
])
def test_cluster_link_settings_are_checked(tmp_path: Path, flags: list[str],
                                           message: str) -> None:
    result = rendezvous("serve", *flags, cwd=tmp_path)
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert message in result.err.strip().splitlines()[-1]
