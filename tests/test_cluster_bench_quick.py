"""The cluster benchmark (bench/cluster.py) end to end, on its smallest counts.

It runs ``python -m bench.cluster --quick`` as a person would (redis-server and three relay
nodes as real subprocesses) and checks that every figure is there and positive, and that the
forwarding node sent every client on its one internal link, most with no Redis lookup. No timing
thresholds: this machine's speed is not under test here, the benchmark is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0  # the quick run takes ~10 s; this bounds a broken one


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_quick_cluster_bench_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "target: forwarded p50 <= local p50 + 1 ms" in proc.stdout
    found = json.loads(out.read_text())
    assert set(found["paths"]) == {"local", "forwarded", "forwarded, Redis lookup"}
    for figures in found["paths"].values():
        for name in ("p50_ms", "p99_ms", "cycles_per_s", "bulk_mb_per_s", "bulk_bound_mb_per_s"):
            assert figures[name] > 0, (name, figures)
    assert found["verdict"] in ("PASS", "MISS")
    internal = found["internal"]
    cycles = found["paths"]["forwarded"]["cycles"]
    assert internal["links_opened"] == 1  # one handshake for every client B forwarded
    assert internal["streams_out"] >= cycles
    # B asked Redis once (the warm-up's first client); then A took nearly every client
    # straight away (a refusal: the hidden server was re-parking all of its connections).
    assert internal["route_hits"] + internal["route_misses"] >= cycles
    assert internal["route_hits"] >= internal["route_misses"]
