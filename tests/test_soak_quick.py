"""The soak script's short form (bench/soak.py --quick): a relay subprocess under verified
pairings with injected faults, token and visitor-password guessers, slow peers and a bare-socket
flood, for about 20 seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOAK = ROOT / "bench" / "soak.py"


@pytest.mark.timeout(90)
def test_quick_soak_passes_with_every_good_pairing_verified(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--quick", "--json", str(report_path)],
        capture_output=True, text=True, timeout=80, check=False, cwd=ROOT)
    summary = result.stdout.split("\n{", 1)[0]
    assert result.returncode == 0, f"{summary}\n{result.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert report["ok"], report["failures"]
    pairings = report["pairings"]
    assert pairings["good_completed"] > 0
    assert pairings["good_completed"] == pairings["good_started"]
    assert pairings["good_failed"] == 0 and pairings["all_good_verified"]
    assert pairings["bytes_verified"] > 0
    assert pairings["pipelined_cross_id_verified"] > 0  # each request to its own hidden server
    assert report["unexpected_errors"] == {}
    attackers = report["attackers"]
    assert attackers["successes"] == 0
    assert attackers["guesses"] > 0 and attackers["429s"] > 0  # the limiter answered
    assert attackers["slow_cut_by_relay"] > 0
    visitors = report["visitor_guessing"]  # pipelined visitor-password guesses
    assert visitors["401s"] > 0 and visitors["429s"] > 0 and visitors["closed_by_relay"] > 0
    flood = report["flood"]  # more bare sockets from one address than its cap
    assert flood["closed_at_once"] > 0 and flood["closed_at_handshake_deadline"] > 0
    log = report["relay"]["log"]
    assert log["rejections_counted"] > log["rejection_lines"]  # floods logged as counts
    assert sum(report["faults_expected_outcomes"].values()) > 0
    relay = report["relay"]
    assert relay["exit_code"] == 0
    assert relay["log"]["error_lines"] == 0
    assert relay["fds"]["end"] <= relay["fds"]["allowed"]
    assert report["elapsed_s"] < 40
