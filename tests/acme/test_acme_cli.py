"""The README's "on a VPS with a domain" path, as an operator runs it, against pebble: one
``rendezvous serve --acme`` process, ``users add --name``, a hidden agent that trusts only the
system's CAs (here: pebble's root as the system store), and visitors with curl that give no
``--cacert``-style pin of the relay's own certificate. Then a restart orders nothing; the flags'
misuses are clean errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pebble_support import Pebble, run_pebble
from support import free_port, stop_process, tail, wait_for_port

from rendezvous.server.certstore import REDIS_PREFIX

NAME = "relay.test"
RUN_TIMEOUT = 60.0

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    yield from run_pebble(tmp_path)


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")}
    return subprocess.run([sys.executable, "-m", "rendezvous", *args], cwd=cwd,
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)


def start(args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None,
          ) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "rendezvous", *args], cwd=cwd,
                                env={**clean, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_for(predicate: Callable[[], bool], what: str, log: Path, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen; relay log:\n{tail(log, 40)}")
        time.sleep(0.2)


def trusted_by(root: Path, port: int, host: str) -> bool:
    """Whether a handshake for ``host`` verifies against ``root`` alone."""
    context = ssl.create_default_context(cafile=str(root))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def curl(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    # CURL_CA_BUNDLE replaces curl's system store: pebble's root plays a public CA's.
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args],
                          env={**os.environ, "CURL_CA_BUNDLE": str(root)},
                          capture_output=True, text=True, timeout=30, check=False)


def test_one_command_on_a_vps_with_a_domain(pebble: Pebble, tmp_path: Path) -> None:
    port = pebble.tls_port
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root_pem)
    log = tmp_path / "relay.log"
    serve = ["serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", "data",
             "--public-host", NAME, "--domain", NAME, "--acme",
             "--acme-email", "ops@relay.test", "--acme-directory", pebble.directory,
             "--acme-ca-bundle", str(pebble.ca_bundle), "--registry-poll", "0.2"]
    relay = start(serve, tmp_path, log)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from the hidden server\n")
    web_port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(web_port), "--bind",
                            "127.0.0.1", "--directory", str(site)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent: subprocess.Popen[bytes] | None = None
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        wait_for(lambda: trusted_by(root, port, NAME), "the main certificate", log)
        assert pebble.orders() == 1

        added = cli("users", "add", "--name", "hub", "--out", "hub.json", "--data-dir", "data",
                    "--json", cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        uuid = json.loads(added.stdout)["uuid"]
        document = json.loads((tmp_path / "hub.json").read_text())
        assert document["server"]["host"] == NAME
        assert "ca" not in document["server"], "a CA-issued certificate needs no pin"
        shown = cli("users", "show", uuid, "--data-dir", "data", cwd=tmp_path)
        assert f"https://hub.{NAME}:{port}/" in shown.stdout, shown.stdout

        # The agent trusts the system store only (which here is pebble's root) and reaches
        # the relay by its name.
        agent = start(["hidden", "--config", "hub.json", "--forward", str(web_port),
                       "--server", f"127.0.0.1:{port}", "--pool", "2"], tmp_path,
                      tmp_path / "agent.log", env={"SSL_CERT_FILE": str(root)})
        resolve = ["--resolve", f"{NAME}:{port}:127.0.0.1",
                   "--resolve", f"hub.{NAME}:{port}:127.0.0.1"]

        def main_name_works() -> bool:
            answer = curl(*resolve, "--digest", "-u", f"{uuid}:x",
                          f"https://{NAME}:{port}/", root=root)
            return answer.returncode == 0 and "hello from the hidden server" in answer.stdout

        wait_for(main_name_works, "a visitor through the main name (agent parked)",
                 tmp_path / "agent.log")
        # The named host: its own certificate, ordered when the name was made; no login.
        wait_for(lambda: trusted_by(root, port, f"hub.{NAME}"), "hub's certificate", log)
        named = curl(*resolve, f"https://hub.{NAME}:{port}/", root=root)
        assert named.returncode == 0, named.stderr
        assert "hello from the hidden server" in named.stdout
        assert pebble.orders() == 2
        stop_process(relay)

        # A restart reuses both stored certificates: pebble sees no new order.
        relay = start(serve, tmp_path, log)
        wait_for_port("127.0.0.1", port, timeout=20)
        assert trusted_by(root, port, NAME) and trusted_by(root, port, f"hub.{NAME}")
        wait_for(main_name_works, "a visitor after the restart", tmp_path / "agent.log")
        assert pebble.orders() == 2
        assert "Traceback" not in log.read_text()
    finally:
        if agent is not None:
            stop_process(agent)
        stop_process(relay)
        stop_process(web)


# From SIGTERM to exit, with an order held pending: far below how long pebble holds it (its
# validation of a challenge that never answers), far above a relay's ordinary stop.
EXIT_BOUND = 8.0


def test_a_stop_during_an_order_abandons_it_at_once(pebble: Pebble, tmp_path: Path,
                                                     redis_url: str) -> None:
    """SIGTERM while pebble validates the relay's challenge: ``serve`` exits within EXIT_BOUND,
    the order abandoned, its challenge withdrawn and the order lock released in the cluster's
    Redis, all logged."""
    cluster_url = redis_url.rsplit("/", 1)[0] + "/6"
    shared = redis.Redis.from_url(cluster_url)
    shared.flushdb()
    # pebble validates TLS-ALPN-01 at tls_port: a listener there that takes the connection and
    # never answers holds the validation, and so the order, pending. The relay is elsewhere.
    holder = socket.create_server(("127.0.0.1", pebble.tls_port))
    holder.settimeout(RUN_TIMEOUT)
    log = tmp_path / "relay.log"
    relay = start(["serve", "--host", "127.0.0.1", "--port", str(free_port()), "--data-dir",
                   "data", "--public-host", NAME, "--acme", "--acme-directory", pebble.directory,
                   "--acme-ca-bundle", str(pebble.ca_bundle), "--cluster", cluster_url,
                   "--node-id", "A", "--internal", f"127.0.0.1:{free_port()}",
                   "--cluster-key", "acme-abandon-key-0123456789"], tmp_path, log)
    validation: socket.socket | None = None
    try:
        validation, _ = holder.accept()  # pebble is validating: the order is pending
        assert shared.get(REDIS_PREFIX + "lock") == b"A"
        assert shared.hlen(REDIS_PREFIX + "challenges") == 1
        assert "acme order abandoned" not in log.read_text()

        relay.send_signal(signal.SIGTERM)
        try:
            status = relay.wait(EXIT_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {EXIT_BOUND} s after SIGTERM:\n"
                                 f"{tail(log, 20)}") from None
        assert status == 0, tail(log, 20)
        text = log.read_text()
        assert "acme order abandoned" in text and "lock=released" in text, text
        assert "challenges_withdrawn=1" in text and "Traceback" not in text, text
        assert shared.get(REDIS_PREFIX + "lock") is None
        assert shared.hlen(REDIS_PREFIX + "challenges") == 0
    finally:
        stop_process(relay)
        if validation is not None:
            validation.close()
        holder.close()
        shared.flushdb()
        shared.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--acme", "--public-host", NAME, "--cert", "c.pem", "--key", "k.pem"],
     "--cert/--key may only give a wildcard certificate for *.DOMAIN"),
    (["--acme", "--public-host", NAME, "--no-tls"], "leave out --no-tls"),
    (["--acme", "--public-host", NAME, "--acme-ca-bundle", "missing.pem"],
     "--acme-ca-bundle: no such file"),
    (["--acme", "--public-host", "203.0.113.7"], "at least one --public-host NAME"),
])
def test_acme_flag_misuse_is_a_clean_error(tmp_path: Path, args: list[str],
                                           message: str) -> None:
    result = cli("serve", "--port", str(free_port()), "--data-dir", "data", *args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rendezvous: error: ") and message in last, result.stderr
