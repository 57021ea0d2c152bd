"""The benchmark suite (bench/) end to end, on its smallest counts.

It runs ``python -m bench.run --tiny`` exactly as a person would (our relay and haproxy as real
subprocesses, the bench's agents as more) and checks that the results file holds every figure for
both relays with a positive value. No timing thresholds: this machine's speed is not under test
here, the suite is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 110.0  # the tiny run takes under 30 s; this bounds a broken one

CYCLE_FIGURES = ("rate", "p50", "p99", "cpu")
BULK_FIGURES = {f"{figure}.{what}" for figure in ("down", "up", "both", "4pairings", "downraw")
                for what in ("mbs", "cpu")}
TINY_PARKED = (100, 300)  # bench.run's SCALES["tiny"].parked


def haproxy_installed() -> bool:
    return shutil.which("haproxy") is not None or Path("/usr/sbin/haproxy").exists()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if not haproxy_installed():
        pytest.skip("haproxy is not installed (scripts/test installs it)")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--tiny", "--no-profile", "--no-chart",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "ours/hap" in proc.stdout  # the printed table
    loaded: dict[str, object] = json.loads((out / "latest.json").read_text())
    return loaded


def test_every_figure_is_there(results: dict[str, object]) -> None:
    rows = results["rows"]
    assert isinstance(rows, list)
    keys = {row["key"] for row in rows}
    expected = {"parked.latency0.p50", "parked.latencytop.p50"}
    for mode in ("tls", "plain"):
        for concurrency in (1, 50):
            expected |= {f"{mode}.cycles.c{concurrency}.{what}" for what in CYCLE_FIGURES}
        expected |= {f"{mode}.bulk.{figure}" for figure in BULK_FIGURES}
    for level in TINY_PARKED:
        expected |= {f"parked.{level}.{what}" for what in ("rss", "fds", "total")}
    assert expected <= keys, sorted(expected - keys)


def test_every_figure_is_positive_for_both_relays(results: dict[str, object]) -> None:
    rows = results["rows"]
    assert isinstance(rows, list)
    for row in rows:
        assert row["ours"] > 0, row
        assert row["haproxy"] > 0, row
        assert row["ratio"] > 0, row


def test_every_target_has_a_verdict(results: dict[str, object]) -> None:
    targets = results["targets"]
    assert isinstance(targets, list)
    names = " | ".join(t["name"] for t in targets)
    for needle in ("tls bulk", "plain bulk", "50 concurrent", "sequential", "RSS",
                   "descriptors", "pairing p50"):
        assert needle in names
    for target in targets:
        assert isinstance(target["passed"], bool)
        assert target["measured"] > 0, target
    issue_15 = " | ".join(t["name"] for t in targets if t["issue"] == "#15")
    for needle in ("TLS relay CPU per pairing", "ours / floor", "plain relay CPU per pairing",
                   "framed (per-request routing) / raw"):
        assert needle in issue_15


def test_the_floor_is_two_handshakes_below_what_a_relay_spends(
        results: dict[str, object]) -> None:
    """The floor (bench/floor.py) is measured in the run, with the relays' cipher, and is
    below either relay's CPU per TLS pairing (each does those two handshakes and more)."""
    details = results["details"]
    assert isinstance(details, dict)
    floor = details["tls"]["floor"]
    assert floor["cipher"] == details["tls"]["cycles"]["1"]["ours"]["cipher"][0]
    assert floor["handshake_ms"] > 0 and floor["pairing_ms"] == 2 * floor["handshake_ms"]
    rows = {row["key"]: row for row in results["rows"]}  # type: ignore[union-attr]
    for concurrency in (1, 50):
        row = rows[f"tls.cycles.c{concurrency}.cpu"]
        assert row["floor"] == floor["pairing_ms"]
        assert row["floor"] < min(row["ours"], row["haproxy"])


def test_the_runs_were_clean(results: dict[str, object]) -> None:
    """No figure lost a transfer or a cycle (a bench or relay bug, not slowness)."""
    details = results["details"]
    assert isinstance(details, dict)
    for mode in ("tls", "plain"):
        for by_system in details[mode]["cycles"].values():
            for system, figure in by_system.items():
                assert figure["errors"] == 0, (mode, system, figure["error_samples"])
        for by_system in details[mode]["bulk"].values():
            for system, figure in by_system.items():
                assert figure["errors"] == 0, (mode, system, figure)


def test_peek_bench_quick(tmp_path: Path) -> None:
    """bench/peek.py (the cost of reading ClientHellos for ACME) runs and writes every figure."""
    out = tmp_path / "peek.json"
    proc = subprocess.run([sys.executable, "-m", "bench.peek", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads(out.read_text())
    assert set(found["us_per_connection"]) == {"off", "idle", "pending"}
    assert all(value > 0 for value in found["us_per_connection"].values())
    assert found["parse_us_chromium_hello"] > 0 and found["accept_check_ns_idle"] > 0
