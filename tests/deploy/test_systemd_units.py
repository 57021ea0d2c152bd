"""deploy/systemd: the units pass ``systemd-analyze verify``, and say what the issue asks.

``systemd-analyze verify`` needs no running systemd. It checks that ExecStart's program exists,
so each unit is verified as a copy whose ``/usr/local/bin/rendezvous`` (where the README installs
it) is this venv's ``rendezvous``; anything it prints (an unknown key, a value it cannot parse,
which it only warns about) fails the test. The units' command lines are parsed by the real CLI
parser, so a flag that does not exist fails too.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rendezvous.cli import build_parser
from rendezvous.config import DEFAULT_MAX_CONNECTIONS

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
RELAY = UNITS / "rendezvous-relay.service"
HIDDEN = UNITS / "rendezvous-hidden@.service"
SYSUSERS = UNITS / "rendezvous.sysusers"
INSTALLED = "/usr/local/bin/rendezvous"
FILE_HEADROOM = 64  # what `rendezvous serve` wants beyond --max-connections (server/app.py)
VERIFY_TIMEOUT = 60.0

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (scripts/test installs Debian's systemd)")


def service_section(unit: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser["Service"]


def exec_start(unit: Path, **values: str) -> list[str]:
    """ExecStart's arguments after the program: ``${NAME}`` replaced by ``values[NAME]``, other
    $VARIABLES (the optional extra arguments, empty by default) left out."""
    words = shlex.split(service_section(unit)["ExecStart"])
    words = [values.get(w[2:-1], w) if w.startswith("${") else w for w in words]
    assert words[0] == INSTALLED, words
    return [w for w in words[1:] if not w.startswith("$")]


def verify(unit_text: str, name: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(unit_text.replace(INSTALLED, str(Path(sys.executable).parent / "rendezvous")))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=VERIFY_TIMEOUT, stdin=subprocess.DEVNULL)


@needs_systemd
@pytest.mark.parametrize(("unit", "name"), [(RELAY, RELAY.name),
                                            (HIDDEN, "rendezvous-hidden@hub.service")])
def test_systemd_analyze_verify(unit: Path, name: str, tmp_path: Path) -> None:
    proc = verify(unit.read_text(), name, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


@needs_systemd
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad limit are reported."""
    text = RELAY.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
    text = text.replace("LimitNOFILE=16384", "LimitNOFILE=lots")
    proc = verify(text, RELAY.name, tmp_path)
    assert "ProtectSystm" in proc.stderr and "lots" in proc.stderr


def test_relay_unit_hardening() -> None:
    service = service_section(RELAY)
    assert service["User"] == "rendezvous"
    assert service["StateDirectory"] == "rendezvous"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["Restart"] == "on-failure"
    assert "--log-file" not in service["ExecStart"]  # the journal gets stderr


def test_relay_unit_command_and_file_limit() -> None:
    """The command parses as `rendezvous serve` on port 443, and LimitNOFILE leaves the relay
    the descriptors it asks for on top of --max-connections (else it warns at start)."""
    args = build_parser().parse_args(exec_start(RELAY))
    assert args.command == "serve"
    assert args.port == 443
    assert args.max_connections == DEFAULT_MAX_CONNECTIONS
    assert args.malloc_trim_interval > 0  # the relay gives a scan's memory back
    assert "LD_PRELOAD" not in RELAY.read_text()  # and needs no other allocator for it
    limit = int(service_section(RELAY)["LimitNOFILE"])
    assert limit >= args.max_connections + FILE_HEADROOM


def test_hidden_unit_command() -> None:
    service = service_section(HIDDEN)
    args = build_parser().parse_args(exec_start(HIDDEN, FORWARD="127.0.0.1:8080"))
    assert args.command == "hidden"
    assert str(args.config) == "/etc/rendezvous/hidden/%i.json"
    assert service["EnvironmentFile"] == "/etc/rendezvous/hidden/%i.env"
    assert service["User"] == "rendezvous"
    assert service["StateDirectory"].startswith("rendezvous-hidden/")
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["LimitNOFILE"]) >= 2 * 1000  # --pool allows up to 1,000


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_units_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
                          capture_output=True, text=True, timeout=VERIFY_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert "rendezvous" in users
    assert users["rendezvous"][5] == "/var/lib/rendezvous"
    assert users["rendezvous"][6].endswith("nologin")
