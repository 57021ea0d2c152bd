"""``users add --name``, ``users rename``, and the visitor URL ``users show`` prints."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import requests
from support import free_port, stop_process, wait_for_port
from test_cli import failed, ok, rendezvous


def test_names_through_the_cli(tmp_path: Path) -> None:
    ok(rendezvous("users", "add", "--uuid", "one", "--name", "Hub", cwd=tmp_path))
    shown = ok(rendezvous("users", "show", "one", "--json", cwd=tmp_path)).json()
    assert shown["name"] == "hub"  # kept in lower case, as DNS compares names
    assert "url" not in shown  # no relay has said its domain yet

    failed(rendezvous("users", "add", "--uuid", "two", "--name", "hub", cwd=tmp_path),
           "a hidden server named 'hub' already exists")
    failed(rendezvous("users", "add", "--uuid", "two", "--name=-hub", cwd=tmp_path),
           "one DNS label")
    failed(rendezvous("users", "add", "--uuid", "two", "--name", "a.b", cwd=tmp_path),
           "one DNS label")
    # Nothing was half-added by the refusals.
    listed = ok(rendezvous("users", "list", "--json", cwd=tmp_path)).json()
    assert [e["uuid"] for e in listed] == ["one"]

    ok(rendezvous("users", "add", "--uuid", "two", cwd=tmp_path))
    failed(rendezvous("users", "rename", "two", "hub", cwd=tmp_path), "already exists")
    failed(rendezvous("users", "rename", "nope", "x", cwd=tmp_path), "no hidden server")
    renamed = ok(rendezvous("users", "rename", "one", "garden", cwd=tmp_path))
    assert "named garden" in renamed.out
    ok(rendezvous("users", "rename", "two", "hub", cwd=tmp_path))  # free again

    table = ok(rendezvous("users", "list", cwd=tmp_path)).out.splitlines()
    assert table[0].split() == ["ID", "NAME", "LABEL", "CREATED"]
    assert table[1].split()[:2] == ["one", "garden"]
    assert table[2].split()[:2] == ["two", "hub"]

    text = ok(rendezvous("users", "show", "two", "--domain", "Relay.Example.com.",
                         cwd=tmp_path)).out
    assert "name:     hub" in text
    assert "URL:      https://hub.relay.example.com:8899/" in text

    cleared = ok(rendezvous("users", "rename", "one", "--clear", cwd=tmp_path))
    assert "no name" in cleared.out
    assert ok(rendezvous("users", "show", "one", "--json", cwd=tmp_path)).json().get("name") is None
    failed(rendezvous("users", "rename", "one", "", cwd=tmp_path), "the name is empty")

    rows = sqlite3.connect(tmp_path / "data" / "registry.sqlite3").execute(
        "SELECT uuid, name FROM entries ORDER BY uuid").fetchall()
    assert rows == [("one", ""), ("two", "hub")]


def test_show_takes_the_domain_from_the_relay_record(tmp_path: Path) -> None:
    ok(rendezvous("users", "add", "--uuid", "one", "--name", "hub", cwd=tmp_path))
    record = {"host": "relay.example.com", "port": 8443, "cert": None,
              "domain": "relay.example.com"}
    (tmp_path / "data" / "relay.json").write_text(json.dumps(record))
    shown = ok(rendezvous("users", "show", "one", "--json", cwd=tmp_path)).json()
    assert shown["url"] == "https://hub.relay.example.com:8443/"
    record["port"] = 443
    (tmp_path / "data" / "relay.json").write_text(json.dumps(record))
    text = ok(rendezvous("users", "show", "one", cwd=tmp_path)).out
    assert "URL:      https://hub.relay.example.com/" in text


def test_names_on_redis(tmp_path: Path, redis_registry_url: str) -> None:
    url = redis_registry_url
    ok(rendezvous("users", "add", "--uuid", "r1", "--name", "hub", "--registry", url,
                  cwd=tmp_path))
    failed(rendezvous("users", "add", "--uuid", "r2", "--name", "hub", "--registry", url,
                      cwd=tmp_path), "already exists")
    ok(rendezvous("users", "remove", "r1", "--registry", url, cwd=tmp_path))
    ok(rendezvous("users", "add", "--uuid", "r2", "--name", "hub", "--registry", url,
                  cwd=tmp_path))


def test_serve_refuses_a_bad_domain(tmp_path: Path) -> None:
    for bad in ("under_score.example", "-x.example", "a..b"):
        failed(rendezvous("serve", "--port", "0", f"--domain={bad}", cwd=tmp_path),
               "invalid --domain")


def test_the_standalone_admin_page_shows_the_recorded_domain(tmp_path: Path) -> None:
    ok(rendezvous("users", "add", "--uuid", "one", "--name", "hub", cwd=tmp_path))
    record = {"host": "relay.example.com", "port": 443, "cert": None,
              "domain": "relay.example.com"}
    (tmp_path / "data" / "relay.json").write_text(json.dumps(record))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "admin", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 20, proc)
        page = requests.get(f"http://127.0.0.1:{port}/entry?id=one", timeout=10)
        assert page.status_code == 200
        assert 'id="visitor-url" href="https://hub.relay.example.com/"' in page.text
        qr = requests.get(f"http://127.0.0.1:{port}/visitor-qr.svg?id=one", timeout=10)
        assert qr.status_code == 200 and qr.text.lstrip().startswith("<svg")
    finally:
        stop_process(proc)
