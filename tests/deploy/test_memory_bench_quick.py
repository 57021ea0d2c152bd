"""bench/memory.py end to end, in its quick form (two waves of 400 hostile connections).

It runs ``python -m bench.memory --quick`` as a person would, for the relay with its trimming
off (glibc as it comes) and as it runs by default, and checks the results file: every hostile
connection of every wave was held and then closed by the relay, the relay still answered a
real client afterwards, every figure and target verdict is there; and the one claim the quick
form can test without timing: the relay's own trimming gives back what glibc alone keeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 150.0  # the quick run takes ~35 s; this bounds a broken one
MiB = 1 << 20
QUICK_WAVES, QUICK_PER_WAVE = 2, 400  # bench.memory's SCALES["quick"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--quick", "--variant", "glibc",
         "--variant", "default", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "[PASS]" in proc.stdout or "[MISS]" in proc.stdout
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def variants(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["variant"]: v for v in results["variants"]}


def test_every_wave_was_held_and_closed(results: dict[str, Any]) -> None:
    found = variants(results)
    assert set(found) == {"glibc", "default"}
    for variant in found.values():
        assert len(variant["waves"]) == QUICK_WAVES
        for wave in variant["waves"]:
            assert wave["held"] == QUICK_PER_WAVE and wave["failed"] == 0, wave
            # The relay held one descriptor per hostile connection (each reached it).
            assert wave["relay_files_held"] >= QUICK_PER_WAVE, wave
            assert wave["rss_held"] > 0 and wave["per_connection"] > 0
        assert variant["alive_after"] is True
        assert variant["exit_code"] == 0


def test_figures_and_verdicts(results: dict[str, Any]) -> None:
    for variant in variants(results).values():
        assert variant["start"] > 0 and variant["peak"] >= variant["start"]
        assert variant["after"] and all(rss > 0 for _, rss in variant["after"])
        names = " | ".join(t["name"] for t in variant["targets"])
        assert "within 64 MiB" in names and "per hostile connection" in names
        for target in variant["targets"]:
            assert isinstance(target["passed"], bool) and target["measured"] is not None


def test_trimming_gives_back_what_glibc_keeps(results: dict[str, Any]) -> None:
    found = variants(results)
    kept = found["glibc"]["end"] - found["glibc"]["start"]
    if kept < 8 * MiB:
        pytest.skip(f"glibc kept only {kept / MiB:.1f} MiB this time: nothing to compare")
    back = found["default"]["end"] - found["default"]["start"]
    assert back <= kept / 2, (back / MiB, kept / MiB)
