"""relay.toml: precedence (flag > variable > file > default), every error path, `config show`
and `config init`, and SIGHUP reloading a limit on a real `rendezvous serve`."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import PARKED, recv_exactly
from support import free_port, stop_process, tail, wait_for_port

from rendezvous.cli import main, settings
from rendezvous.cli.configcmd import serve_options
from rendezvous.config import DEFAULT_MAX_PER_ADDRESS, DEFAULT_POOL_SIZE
from rendezvous.protocol.totp import current_token
from rendezvous.provisioning import load_provisioning

README = Path(__file__).resolve().parent.parent / "README.md"


def rendezvous(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rendezvous", *args], capture_output=True,
                          text=True, timeout=30, check=False, env=env)


def shown(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, tuple[str, str]]:
    """`config show ARGV` as key -> (value, source), keys as "[section] name" or "name"."""
    assert main(["config", "show", *argv]) == 0
    found: dict[str, tuple[str, str]] = {}
    section = ""
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        match = re.match(r"^([a-z-]+) = (.*?)\s+# (.*)$", line)
        if match:
            name = f"[{section}] {match[1]}" if section else match[1]
            found[name] = (match[2], match[3])
    return found


def error_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------------------- precedence


def test_flag_beats_variable_beats_file_beats_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("port = 9001\n\n[limits]\npool-size = 3\nmax-per-address = 7\n"
                    "max-headers = 50\n")
    monkeypatch.setenv("RENDEZVOUS_MAX_PER_ADDRESS", "9")
    monkeypatch.setenv("RENDEZVOUS_MAX_HEADERS", "60")
    found = shown(capsys, "--config", str(path), "--max-headers", "70")
    assert found["port"] == ("9001", f"file {path}:1")
    assert found["[limits] pool-size"] == ("3", f"file {path}:4")
    assert found["[limits] max-per-address"] == ("9", "env $RENDEZVOUS_MAX_PER_ADDRESS")
    assert found["[limits] max-headers"] == ("70", "flag")
    assert found["[limits] pair-wait"] == ("2.0", "default")
    # A flag given with its default's value still wins over the file.
    found = shown(capsys, "--config", str(path), "--pool-size", str(DEFAULT_POOL_SIZE))
    assert found["[limits] pool-size"] == (str(DEFAULT_POOL_SIZE), "flag")


def test_data_dir_relay_toml_is_read_when_present(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert shown(capsys, "--data-dir", str(data))["[limits] pool-size"][1] == "default"
    data.mkdir()
    (data / "relay.toml").write_text("[limits]\npool-size = 2\n")
    assert shown(capsys, "--data-dir", str(data))["[limits] pool-size"] == (
        "2", f"file {data / 'relay.toml'}:2")


def test_switches_lists_and_secrets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[tls]\nno-tls = true\npublic-host = ["a.example", "b.example"]\n'
                    '[admin]\nadmin = true\n[cluster]\ncluster-key = "0123456789abcdef0"\n')
    monkeypatch.setenv("RENDEZVOUS_NO_UVLOOP", "yes")
    found = shown(capsys, "--config", str(path))
    assert found["[tls] no-tls"][0] == "true"
    assert found["[tls] public-host"][0] == '["a.example", "b.example"]'
    assert found["[admin] admin"][0] == '"127.0.0.1:8893"'
    assert found["[runtime] no-uvloop"] == ("true", "env $RENDEZVOUS_NO_UVLOOP")
    assert found["[cluster] cluster-key"][0] == '"(hidden)"'
    monkeypatch.setenv("RENDEZVOUS_PUBLIC_HOST", "c.example, d.example")
    assert shown(capsys, "--config", str(path))["[tls] public-host"][0] == (
        '["c.example", "d.example"]')


# ---------------------------------------------------------------------------- error paths


@pytest.mark.parametrize(("text", "expected"), [
    ("[limits]\npool_size = 2\n", r":2: \[limits\] pool_size: unknown key \(did you mean "
                                  r"pool-size\?\)"),
    ("port = 1\n[cluster]\n\npool-size = 2\n", r":4: \[cluster\] pool-size: unknown key "
                                               r"\(it belongs in \[limits\] pool-size\)"),
    ("[limitz]\npool-size = 2\n", r":1: unknown section \[limitz\]"),
    ("[limits]\npool-size = \"many\"\n", r":2: \[limits\] pool-size: must be a number"),
    ("[limits]\npool-size = 0\n", r":2: \[limits\] pool-size: must be at least 1, not 0"),
    ("[limits]\npair-wait = -1\n", r":2: \[limits\] pair-wait: must be 0 or more seconds"),
    ("port = 70000\n", r":1: port: must be from 0 to 65535, not 70000"),
    ("[tls]\nno-tls = 1\n", r":2: \[tls\] no-tls: must be true or false, not 1"),
    ("[tls]\npublic-host = \"a\"\n", r":2: \[tls\] public-host: must be a list of strings"),
    ("[runtime]\nlog-level = \"loud\"\n", r":2: \[runtime\] log-level: must be one of"),
    ("host = 1\n", r":1: host: must be a string \(in quotes\), not 1"),
    ("[limits\npool-size = 2\n", r"not valid TOML: .*\(at line 1, column \d+\)"),
    ("port = 1\nport = 2\n", r"not valid TOML: .*\(at line 2, column \d+\)"),
])
def test_bad_file_is_one_clear_error_naming_key_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    err = error_of(capsys, "config", "show", "--config", str(path))
    assert err.startswith(f"rendezvous: error: {path}")
    assert re.search(expected, err), err
    assert err.count("\n") == 1


def test_missing_file_given_explicitly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    err = error_of(capsys, "config", "show", "--config", str(missing))
    assert f"{missing}: no such configuration file" in err
    monkeypatch.setenv("RENDEZVOUS_CONFIG", str(missing))
    assert "no such configuration file" in error_of(capsys, "config", "show")


def test_bad_variable_names_the_variable(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENDEZVOUS_POOL_SIZE", "lots")
    assert "$RENDEZVOUS_POOL_SIZE: not an integer: 'lots'" in error_of(capsys, "config", "show")
    monkeypatch.delenv("RENDEZVOUS_POOL_SIZE")
    monkeypatch.setenv("RENDEZVOUS_NO_TLS", "maybe")
    assert "$RENDEZVOUS_NO_TLS: must be true or false" in error_of(capsys, "config", "show")


def test_serve_does_not_start_on_a_bad_file(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "relay.toml"
    path.write_text(f"host = \"127.0.0.1\"\nport = {port}\n[limits]\nmax-connections = -5\n")
    result = rendezvous("serve", "--config", str(path), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert f"{path}:4: [limits] max-connections: must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made


# ---------------------------------------------------------------------------- init and show


def test_init_writes_every_default_and_loads_back_to_defaults(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["config", "init", "--data-dir", str(data)]) == 0
    written = data / "relay.toml"
    text = written.read_text()
    assert written.stat().st_mode & 0o077 == 0
    parser = serve_options()
    for key in settings.keys_of(parser):
        assert f"# {key.flag}:" in text  # each key documented by its flag's help
    # Loaded, the file gives every key its default value.
    args = parser.parse_args(["--config", str(written)])
    found = settings.resolve(parser, args, ["--config", str(written)], environ={})
    assert all(s.value == s.key.action.default for s in found)
    from_file = [s for s in found if s.source.startswith("file")]
    assert len(from_file) > 30  # not all commented out
    assert {s.key.dest for s in from_file} >= {"pool_size", "max_per_address", "port"}
    by_dest = {s.key.dest: s.value for s in found}
    assert by_dest["max_per_address"] == DEFAULT_MAX_PER_ADDRESS
    # Shown from that file, each is "file" and has the same value as with no file at all.
    with_file = shown(capsys, "--config", str(written))
    without = shown(capsys, "--data-dir", str(tmp_path / "empty"))
    without.pop("[registry] data-dir")
    assert {k: v for k, (v, _) in with_file.items()} == {k: v for k, (v, _) in without.items()}


def test_init_refuses_to_overwrite_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "my.toml"
    path.write_text("port = 1\n")
    assert "exists" in error_of(capsys, "config", "init", "--config", str(path))
    assert path.read_text() == "port = 1\n"
    assert main(["config", "init", "--config", str(path), "--force"]) == 0
    assert "pool-size = " in path.read_text()


def test_readme_example_is_a_valid_relay_toml(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has a ```toml example"
    for block in blocks:
        path = tmp_path / "relay.toml"
        path.write_text(block)
        found = shown(capsys, "--config", str(path))
        assert any(source.startswith("file") for _, source in found.values())


# ---------------------------------------------------------------------------- SIGHUP


def test_sighup_reloads_a_limit_keeps_parked_and_says_what_needs_a_restart(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    path = tmp_path / "relay.toml"
    base = f'host = "127.0.0.1"\nport = {port}\n[tls]\nno-tls = true\n[runtime]\n' \
           'log-format = "json"\n'
    path.write_text(base + "[limits]\nmax-per-address = 50\n")
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "rendezvous", "serve", "--config",
                                 str(path), "--data-dir", str(data)],
                                stdout=sink, stderr=subprocess.STDOUT)
    sockets: list[socket.socket] = []
    try:
        wait_for_port("127.0.0.1", port, 20, proc)
        out = tmp_path / "p.json"
        added = rendezvous("users", "add", "--data-dir", str(data), "--out", str(out))
        assert added.returncode == 0, added.stderr
        provisioning = load_provisioning(out)
        assert provisioning.port == port  # the address the file set, via relay.json
        token = current_token(provisioning.base32, provisioning.step, provisioning.digits)
        hidden = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(hidden)
        hidden.sendall(f"CONNECT uuid:{provisioning.uuid}?response={token} HTTP/1.1\r\n\r\n"
                       .encode())
        assert recv_exactly(hidden, len(PARKED)) == PARKED

        path.write_text(base.replace(f"port = {port}", f"port = {port + 1}")
                        + "[limits]\nmax-per-address = 2\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        reloaded: dict[str, str] = {}
        while not reloaded and time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line)["event"] == "reloaded":
                    reloaded = json.loads(line)
            time.sleep(0.05)
        assert reloaded, tail(log)
        assert reloaded["changed"] == "max_per_address=50->2"
        assert reloaded["restart_needed"] == "port"

        # The parked connection counts 1, a second is allowed, a third is over the new cap.
        second = socket.create_connection(("127.0.0.1", port), timeout=5)
        third = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets += [second, third]
        assert third.recv(100).startswith(b"HTTP/1.1 503")
        second.settimeout(0.3)
        with pytest.raises(TimeoutError):
            second.recv(1)  # not refused
        hidden.settimeout(0.3)
        with pytest.raises(TimeoutError):
            hidden.recv(1)  # still parked, nothing dropped
        assert proc.poll() is None

        # A file broken while running: the reload is refused, the relay keeps its settings.
        path.write_text(base + "[limits]\nmax-per-address = 0\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "max-per-address: must be at least 1" in log.read_text()
        assert proc.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        stop_process(proc)


# ---------------------------------------------------------------------------- one public address


def test_users_add_takes_the_public_address_and_registry_from_relay_toml(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    registry = tmp_path / "elsewhere.sqlite3"
    (data / "relay.toml").write_text(
        f'[registry]\nregistry = "sqlite:///{registry}"\n'
        '[public]\nserver-host = "relay.example.test"\nserver-port = 443\n')
    out = tmp_path / "hub.json"
    assert main(["users", "add", "--data-dir", str(data), "--out", str(out)]) == 0
    made = load_provisioning(out)
    assert (made.host, made.port) == ("relay.example.test", 443)
    assert registry.exists()  # the relay's registry, as the file names it
    assert main(["users", "list", "--data-dir", str(data)]) == 0
    assert made.uuid in capsys.readouterr().out
    # A flag still wins, and so does the variable.
    monkeypatch.setenv("RENDEZVOUS_SERVER_PORT", "8443")
    assert main(["users", "add", "--data-dir", str(data), "--out", str(out), "--server-host",
                 "other.example.test"]) == 0
    made = load_provisioning(out)
    assert (made.host, made.port) == ("other.example.test", 8443)
    # A bad relay.toml stops the command with the same one-line error as serve.
    (data / "relay.toml").write_text("[public]\nserver-port = 0\n")
    err = error_of(capsys, "users", "list", "--data-dir", str(data))
    assert "relay.toml:2: [public] server-port: must be from 1 to 65535" in err
