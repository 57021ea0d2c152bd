"""The benchmark suite: our relay against haproxy 2.6, on this machine, in one run.

    .venv/bin/python -m bench.run            # full run, about 10 minutes
    .venv/bin/python -m bench.run --quick    # small counts, under a minute (CI)

Prints every figure for both relays with the ratio ours/haproxy, then the issue's targets with
PASS/MISS; writes bench/results/latest.json and bench/results/chart.png; profiles our relay with
py-spy during each phase whose target it misses (bench/results/profile-*.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import floor, procs, report
from bench.agents import raise_nofile
from bench.procs import Agent, BenchError, Haproxy, Meter, Relay, usage, write_ids

RESULTS = Path(__file__).resolve().parent / "results"
N_IDS = 4  # hidden-server IDs the cycles (and, separately, the bulk transfers) spread over
PARKED_PER_ID = 5  # parked connections per fleet ID in the parked figures
AGENT_MAX = 5_000  # parked connections per agent process (each may hold 20,000 files)
HAPROXY_IDLE_MAX = 9_500  # idle connections haproxy can hold here (see procs.HAPROXY_MAXCONN)
ORIGINAL_CYCLES = 276.0  # node-rendezvous, 50 concurrent, from the issue (not measured here)
# Our relay's flags for every figure: pair at once (--settle 0), a pool big enough for 50
# concurrent clients over 4 IDs, room for 15,000 parked plus clients, all from one address.
RELAY_FLAGS = ["--settle", "0", "--pool-size", "64", "--max-connections", "19500",
               "--max-per-address", "19500"]  # every bench client comes from 127.0.0.1
BUSY_WARNING = 0.25  # cores used by other processes during a figure before we warn


@dataclass(frozen=True, slots=True)
class Scale:
    """How much work each figure gets; every loop is bounded by a count and by a time."""

    name: str
    concurrencies: tuple[int, ...]  # pairing cycles at each (1 = sequential; must include 50)
    cycles: int  # counted cycles per run, concurrency > 1
    seq_cycles: int  # counted cycles, concurrency 1
    cycle_seconds: float  # bound on one run of cycles
    warmup: int  # cycles before counting
    bulk_tls: int  # bytes one way through one pairing
    bulk_plain: int
    bulk_seconds: float  # bound on one transfer
    parked: tuple[int, ...]  # parked connections at which memory and descriptors are read
    probes: int  # sequential cycles for the pairing latency with N parked
    profile_seconds: float
    repeats: int  # runs of each cycles/bulk figure per relay, alternating; the best one counts
    direct: bool = True  # also measure without any relay (the machine's ceiling)


SCALES = {
    "full": Scale("full", (1, 4, 16, 50), 2000, 500, 5.0, 50, 1 << 30, 2 << 30, 60.0,
                  (1000, 5000, 15000), 300, 8.0, 2),
    "quick": Scale("quick", (1, 50), 400, 100, 2.5, 20, 96 << 20, 192 << 20, 20.0,
                   (200, 1000), 40, 2.0, 1, direct=False),
    "tiny": Scale("tiny", (1, 50), 100, 30, 2.0, 10, 16 << 20, 32 << 20, 15.0,
                  (100, 300), 20, 2.0, 1, direct=False),
}


@dataclass(slots=True)
class Row:
    """One printed figure: ours, haproxy's, the ratio, and the no-relay ceiling if measured."""

    key: str
    group: str
    figure: str
    unit: str
    ours: float
    haproxy: float
    better: str = "higher"  # or "lower"
    direct: float | None = None
    note: str = ""
    floor: float | None = None  # TLS: the CPU of the pairing's two handshakes alone (floor.py)
    ratio: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.ratio = self.ours / self.haproxy if self.haproxy else 0.0


@dataclass(slots=True)
class Target:
    """One of the issue's targets, as measured in this run."""

    name: str
    measured: float
    goal: str
    passed: bool
    phase: str  # what to profile on a miss
    unit: str = "x"
    profile: str | None = None
    note: str = ""
    issue: str = "#5"  # the issue that set it


def best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the highest ``key`` (background load only ever slows a run down), with the
    others' values kept beside it."""
    chosen = dict(max(runs, key=lambda r: float(r[key])))
    chosen["repeats"] = [r[key] for r in runs]
    return chosen


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


class Bench:
    """One run of the suite."""

    def __init__(self, scale: Scale, out: Path, work: Path, profile: bool, chart: bool,
                 haproxy_threads: int) -> None:
        self.scale = scale
        self.out = out
        self.work = work
        self.do_profile = profile
        self.do_chart = chart
        self.haproxy_threads = haproxy_threads
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.details: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.extra_profiles: dict[str, str] = {}  # phase: file, profiled with no target missed
        self.cert, self.key = self._certificate()

    # ------------------------------------------------------------------------- plumbing

    def say(self, text: str) -> None:
        print(text, flush=True)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        print(f"  warning: {text}", flush=True)

    def _certificate(self) -> tuple[Path, Path]:
        """One self-signed ECDSA P-256 certificate (``rendezvous cert``) for every TLS server."""
        folder = self.work / "tls"
        subprocess.run([procs.PYTHON, "-m", "rendezvous", "cert", "--host", "127.0.0.1",
                        "--host", "localhost", "--out-dir", str(folder)],
                       check=True, capture_output=True, timeout=30)
        return folder / "cert.pem", folder / "key.pem"

    def agent(self, running: list[Agent], name: str, role: str, *args: Any) -> Agent:
        started = Agent(self.work, name, role, *(str(a) for a in args))
        running.append(started)
        return started

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str,
                   watch: list[Agent] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for agent in watch or []:
                if agent.proc.poll() is not None:
                    raise BenchError(f"{agent.name} exited:\n{procs.tail(agent.log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def wait_parked(self, agents: list[Agent], count: int, timeout: float = 60.0) -> None:
        self.wait_until(lambda: sum(a.last.get("parked", 0) for a in agents) >= count,
                        timeout, f"{count} parked connections", agents)

    def wait_open(self, agents: list[Agent], count: int) -> None:
        self.wait_until(lambda: sum(a.last.get("open", 0) for a in agents) >= count,
                        60 + count / 50, f"{count} idle connections", agents)

    def other_cpu(self, use: dict[str, float], extra: float, wall: float, label: str) -> float:
        """Cores used by processes outside this figure; warn when the machine was busy."""
        ours = sum(v for k, v in use.items() if k not in ("machine", "wall")) + extra
        other = max(0.0, (use["machine"] - ours) / wall) if wall > 0 else 0.0
        if other > BUSY_WARNING:
            self.warn(f"{label}: other processes used {other:.2f} cores meanwhile")
        return other

    # ------------------------------------------------------------------------- figures

    def probe(self, label: str, port: int, ids: str | None, pids: dict[str, int]
              ) -> dict[str, Any]:
        """Sequential pairing latency: the lowest p50 of a few short runs (background load only
        ever adds latency), with the others kept beside it."""
        runs = max(1, self.scale.repeats + 1)
        found = [self.cycles(label, port, True, ids, 1, pids, "relay",
                             max(10, self.scale.probes // runs)) for _ in range(runs)]
        chosen = dict(min(found, key=lambda r: float(r["p50_ms"])))
        chosen["repeats"] = [r["p50_ms"] for r in found]
        return chosen

    def cycles(self, label: str, port: int, tls: bool, ids: str | None, concurrency: int,
               pids: dict[str, int], relay: str, count: int = 0) -> dict[str, Any]:
        """Pairing cycles (or haproxy connections) at one concurrency."""
        scale = self.scale
        count = count or (scale.seq_cycles if concurrency == 1 else scale.cycles)
        args: list[Any] = ["--port", port, "--concurrency", concurrency, "--count", count,
                           "--warmup", scale.warmup, "--seconds", scale.cycle_seconds]
        args += ["--tls"] if tls else []
        args += ["--ids", ids] if ids else []
        with procs.agents() as running:
            meter = Meter({**pids, "bench": os.getpid()})
            mobile = self.agent(running, f"mobile-{label}-c{concurrency}", "mobile", *args)
            result = mobile.result(scale.cycle_seconds + 60)
            use = meter.stop()
        latencies: list[float] = result["latencies"]
        done = max(1, int(result["total"]))
        elapsed = float(result["elapsed"]) or 1e-9
        figure = {
            "rate": len(latencies) / elapsed,
            "p50_ms": 1000 * percentile(latencies, 0.50),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "mean_ms": 1000 * statistics.fmean(latencies) if latencies else 0.0,
            "cycles": len(latencies),
            "elapsed_s": elapsed,
            "errors": result["errors"],
            "error_samples": result["error_samples"],
            "cipher": result["cipher"],
            "relay_cpu_ms_per_cycle": 1000 * use.get(relay, 0.0) / done,
            "relay_cpu_cores": use.get(relay, 0.0) / use["wall"],
            "generator_cpu_ms_per_cycle": 1000 * (use.get("peer", 0.0) + result["cpu"]) / done,
            "other_cpu_cores": self.other_cpu(use, result["cpu_total"], use["wall"],
                                              f"{label} cycles c={concurrency}"),
        }
        if result["errors"]:
            self.warn(f"{label} cycles c={concurrency}: {result['errors']} errors, e.g. "
                      f"{result['error_samples'][:2]}")
        return figure

    def bulk(self, label: str, port: int, tls: bool, ids: str | None, up: int, down: int,
             streams: int, pids: dict[str, int], relay: str, raw: bool = False
             ) -> dict[str, Any]:
        """One bulk transfer (``streams`` pairings at once; ``raw``: a 101 and then the bytes
        unframed); MB/s and the relay's CPU per GB."""
        args: list[Any] = ["--port", port, "--streams", streams, "--up", up, "--down", down,
                           "--seconds", self.scale.bulk_seconds]
        args += ["--tls"] if tls else []
        args += ["--raw"] if raw else []
        args += ["--ids", ids] if ids else []
        with procs.agents() as running:
            meter = Meter({**pids, "bench": os.getpid()})
            mobile = self.agent(running, f"bulk-{label}", "bulk-mobile", *args)
            result = mobile.result(self.scale.bulk_seconds + 60)
            use = meter.stop()
        moved = int(result["bytes"])
        elapsed = float(result["elapsed"]) or 1e-9
        if result["errors"]:
            self.warn(f"{label} bulk: {result['errors']} errors, e.g. "
                      f"{result['error_samples'][:2]}")
        gigabytes = moved / 1e9 or 1e-9
        return {
            "mb_s": moved / elapsed / 1e6,
            "bytes": moved,
            "elapsed_s": elapsed,
            "errors": result["errors"],
            "relay_cpu_s_per_gb": use.get(relay, 0.0) / gigabytes,
            "relay_cpu_cores": use.get(relay, 0.0) / elapsed,
            "generator_cpu_s_per_gb": (use.get("peer", 0.0) + result["cpu"]) / gigabytes,
            "other_cpu_cores": self.other_cpu(use, result["cpu_total"], use["wall"],
                                              f"{label} bulk"),
        }

    # ------------------------------------------------------------------------- groups

    def traffic(self, tls: bool) -> None:
        """Pairing cycles and bulk transfers, TLS on both legs or plain TCP on both."""
        mode = "tls" if tls else "plain"
        scale = self.scale
        tls_flag = ["--tls"] if tls else []
        cert_args = ["--cert", self.cert, "--key", self.key]
        self.say(f"\n== {mode}: our relay{' --no-tls' if not tls else ''} vs haproxy "
                 f"{'TLS on both sides' if tls else 'plain TCP'}")
        relay = Relay(self.work, f"relay-{mode}", tls, self.cert, self.key, RELAY_FLAGS)
        added = relay.add_users([f"bench-{mode}-{i}" for i in range(N_IDS)]
                                + [f"bulk-{mode}-{i}" for i in range(N_IDS)])
        cycle_ids, bulk_ids = added[:N_IDS], added[N_IDS:]
        cycle_file = write_ids(self.work / f"ids-{mode}.json", cycle_ids)
        bulk_file = write_ids(self.work / f"bulk-ids-{mode}.json", bulk_ids)
        one_bulk = write_ids(self.work / f"bulk-id-{mode}.json", bulk_ids[:1])
        detail: dict[str, Any] = {"cycles": {}, "bulk": {}}
        self.details[mode] = detail
        with contextlib.ExitStack() as stack, procs.agents() as running:
            relay.start()
            stack.callback(relay.stop)
            cycles_port, bulk_port = procs.free_port(), procs.free_port()
            backend = self.agent(running, f"backend-{mode}", "backend", "--port", cycles_port,
                                 *tls_flag, *cert_args)
            bulk_backend = self.agent(running, f"bulk-backend-{mode}", "bulk-backend",
                                      "--port", bulk_port, *tls_flag, *cert_args)
            for agent in (backend, bulk_backend):
                agent.wait(lambda m: m.get("event") == "listening", 20, "listening")
            haproxy = Haproxy(self.work, f"haproxy-{mode}", tls, self.cert, self.key,
                              self.haproxy_threads, cycles_port, bulk_port)
            haproxy.start()
            stack.callback(haproxy.stop)
            per_id = math.ceil(max(scale.concurrencies) / N_IDS) + 2
            hidden = self.agent(running, f"hidden-{mode}", "hidden", "--port", relay.port,
                                *tls_flag, "--ids", cycle_file, "--per-id", per_id)
            bulk_hidden = self.agent(running, f"bulk-hidden-{mode}", "bulk-hidden", "--port",
                                     relay.port, *tls_flag, "--ids", bulk_file, "--per-id", 1)
            self.wait_parked([hidden], N_IDS * per_id)
            self.wait_parked([bulk_hidden], N_IDS)
            if tls:  # (here, while every process of the figures is idle)
                detail["floor"] = found = floor.measure(self.cert, self.key)
                self.say(f"  floor: two server-side TLS handshakes (in-process, "
                         f"{found['cipher']}) cost {found['pairing_ms']:.3f} ms of CPU")

            systems = {
                "ours": (relay.port, cycle_file,
                         {"relay": relay.pid, "peer": hidden.proc.pid}),
                "haproxy": (haproxy.port_cycles, None,
                            {"relay": haproxy.pid, "peer": backend.proc.pid}),
                "direct": (cycles_port, None, {"peer": backend.proc.pid}),
            }
            for c in scale.concurrencies:
                runs: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
                for repeat in range(scale.repeats):
                    for system, (port, ids, pids) in systems.items():
                        if system == "direct" and (repeat or not scale.direct):
                            continue  # the ceiling is context: once is enough
                        if system == "ours":
                            self.wait_parked([hidden], N_IDS * per_id)
                        runs[system].append(self.cycles(f"{mode}-{system}", port, tls, ids, c,
                                                        pids, "relay"))
                results = {system: best(found, "rate") for system, found in runs.items() if found}
                detail["cycles"][str(c)] = results
                self.say(f"  cycles, {c:>2} concurrent: " + "  ".join(
                    f"{s} {r['rate']:7.1f}/s p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:7.2f} ms"
                    for s, r in results.items()))

            bulk_systems = {
                "ours": (relay.port, {"relay": relay.pid, "peer": bulk_hidden.proc.pid}),
                "haproxy": (haproxy.port_bulk, {"relay": haproxy.pid,
                                                "peer": bulk_backend.proc.pid}),
                "direct": (bulk_port, {"peer": bulk_backend.proc.pid}),
            }
            size = scale.bulk_tls if tls else scale.bulk_plain
            figures = self.bulk_figures(size)
            for system, (port, pids) in bulk_systems.items():  # warm every path once
                if scale.name == "tiny" or (system == "direct" and not scale.direct):
                    break
                if system == "ours":
                    self.wait_parked([bulk_hidden], N_IDS)
                self.bulk(f"{mode}-{system}-warmup", port, tls,
                          one_bulk if system == "ours" else None, 0, size // 16, 1, pids, "relay")
            for name, (up, down, streams, raw) in figures.items():
                runs = {system: [] for system in bulk_systems}
                for repeat in range(scale.repeats):
                    for system, (port, pids) in bulk_systems.items():
                        if system == "direct" and (repeat or not scale.direct):
                            continue
                        if system == "ours":
                            self.wait_parked([bulk_hidden], N_IDS)
                        ids = ((bulk_file if streams > 1 else one_bulk) if system == "ours"
                               else None)
                        runs[system].append(self.bulk(f"{mode}-{system}-{name}", port, tls, ids,
                                                      up, down, streams, pids, "relay", raw))
                results = {system: best(found, "mb_s") for system, found in runs.items() if found}
                detail["bulk"][name] = results
                self.say(f"  bulk {name:<12}: " + "  ".join(
                    f"{s} {r['mb_s']:7.1f} MB/s ({r['relay_cpu_s_per_gb']:.2f} CPU s/GB)"
                    for s, r in results.items()))
            self.traffic_rows(mode, detail)
            self.traffic_targets(mode, detail)
            self.pairing_targets(mode, detail)

            def cycles_workload(concurrency: int) -> Callable[[float], None]:
                def run(seconds: float) -> None:
                    with procs.agents() as extra:
                        self.wait_parked([hidden], N_IDS * per_id)
                        mobile = self.agent(
                            extra, f"profile-mobile-{mode}-c{concurrency}", "mobile",
                            "--port", relay.port, *tls_flag, "--ids", cycle_file,
                            "--concurrency", concurrency, "--count", 1_000_000,
                            "--warmup", 0, "--seconds", seconds)
                        mobile.result(seconds + 60)
                return run

            def bulk_workload(up: int, down: int, streams: int, raw: bool
                              ) -> Callable[[float], None]:
                def run(seconds: float) -> None:
                    deadline = time.monotonic() + seconds
                    while time.monotonic() < deadline:
                        self.wait_parked([bulk_hidden], N_IDS)
                        self.bulk(f"{mode}-profile", relay.port, tls,
                                  bulk_file if streams > 1 else one_bulk, up, down, streams,
                                  {"relay": relay.pid}, "relay", raw)
                return run

            workloads: dict[str, Callable[[float], None]] = {
                f"{mode}-cycles-c50": cycles_workload(50),
                f"{mode}-cycles-c1": cycles_workload(1),
            }
            for name, (up, down, streams, raw) in figures.items():
                workloads[f"{mode}-bulk-{name.replace(' ', '-')}"] = bulk_workload(
                    up, down, streams, raw)
            self.profile_misses(relay.pid, workloads)
            # The figure most telling of per-connection Python cost, when no miss profiled it.
            c50 = detail["cycles"]["50"]
            phase = f"{mode}-cycles-c50"
            if (mode == "plain" and self.do_profile
                    and not any(t.profile and t.phase == phase for t in self.targets)
                    and c50["ours"]["rate"] < 0.85 * c50["haproxy"]["rate"]):
                self.extra_profiles[f"{mode}-cycles-c50"] = self.profile(
                    f"{mode}-cycles-c50", relay.pid, cycles_workload(50))

    def bulk_figures(self, size: int) -> dict[str, tuple[int, int, int, bool]]:
        """name: (bytes up, bytes down, pairings, raw) -- each figure moves about 1 to 2x
        ``size``."""
        return {
            "down": (0, size, 1, False),  # hidden server to mobile client
            "up": (size, 0, 1, False),  # mobile client to hidden server
            "both": (size // 2, size // 2, 1, False),  # both directions at once
            "4 pairings": (0, size // 2, 4, False),  # four pairings downloading at once
            # The same download answered 101 and sent unframed: what following HTTP costs.
            "down raw": (0, size, 1, True),
        }

    def parked(self) -> None:
        """Memory and descriptors per parked connection, and the pairing latency meanwhile."""
        scale = self.scale
        self.say(f"\n== parked: our relay (TLS) with {', '.join(map(str, scale.parked))} parked "
                 "vs haproxy with as many idle TLS connections")
        detail: dict[str, Any] = {"ours": {}, "haproxy": {}}
        self.details["parked"] = detail
        top = max(scale.parked)

        # Ours: the fleet parks PARKED_PER_ID connections per ID, over several processes.
        relay = Relay(self.work, "relay-parked", True, self.cert, self.key, RELAY_FLAGS)
        probe = relay.add_users(["bench-probe"])
        probe_file = write_ids(self.work / "ids-probe.json", probe)
        fleet = relay.add_fleet("fleet", math.ceil(top / PARKED_PER_ID))
        with contextlib.ExitStack() as stack, procs.agents() as running:
            relay.start()
            stack.callback(relay.stop)
            prober = self.agent(running, "hidden-probe", "hidden", "--port", relay.port,
                                "--tls", "--ids", probe_file, "--per-id", 2)
            self.wait_parked([prober], 2)
            probe_pids = {"relay": relay.pid, "peer": prober.proc.pid}
            before = self.probe("parked-ours-0", relay.port, probe_file, probe_pids)
            detail["ours"]["latency_0"] = before
            time.sleep(0.5)
            base = usage(relay.pid)
            detail["ours"]["base"] = asdict(base)
            fleet_agents: list[Agent] = []
            used_ids = 0
            for level in scale.parked:
                have = sum(a.last.get("parked", 0) for a in fleet_agents)
                while have < level:
                    n = min(AGENT_MAX, level - have)
                    chunk = fleet[used_ids: used_ids + math.ceil(n / PARKED_PER_ID)]
                    used_ids += len(chunk)
                    have += len(chunk) * PARKED_PER_ID
                    chunk_file = write_ids(self.work / f"fleet-{len(fleet_agents)}.json", chunk)
                    fleet_agents.append(self.agent(
                        running, f"fleet-{len(fleet_agents)}", "hidden", "--port", relay.port,
                        "--tls", "--ids", chunk_file, "--per-id", PARKED_PER_ID, "--ramp", 48))
                self.wait_parked(fleet_agents, level, timeout=60 + level / 50)
                reading = self.settled_usage(relay.pid, base.fds + level)
                detail["ours"][str(level)] = self.per_connection(reading, base, level)
                text = self.level_text(detail["ours"][str(level)])
                self.say(f"  ours    {level:>6} parked: {text}")
            after = self.probe("parked-ours-top", relay.port, probe_file, probe_pids)
            detail["ours"]["latency_top"] = after
            self.say(f"  ours    pairing p50 {before['p50_ms']:.2f} ms with ~0 parked, "
                     f"{after['p50_ms']:.2f} ms with {top} parked")
            with contextlib.suppress(OSError):
                detail["ours"]["smaps_rollup"] = Path(
                    f"/proc/{relay.pid}/smaps_rollup").read_text()
            parked_targets = self.parked_targets(detail, top)
            if any(not t.passed for t in parked_targets):
                self.explain_parked_misses(relay.pid, parked_targets, probe_file, relay.port)

        # haproxy: idle TLS clients on the inspect-delay frontend, one socket each.
        with contextlib.ExitStack() as stack, procs.agents() as running:
            backend_port = procs.free_port()
            backend = self.agent(running, "backend-parked", "backend", "--port", backend_port,
                                 "--tls", "--cert", self.cert, "--key", self.key)
            backend.wait(lambda m: m.get("event") == "listening", 20, "listening")
            haproxy = Haproxy(self.work, "haproxy-parked", True, self.cert, self.key,
                              self.haproxy_threads, backend_port, backend_port)
            haproxy.start()
            stack.callback(haproxy.stop)
            pids = {"relay": haproxy.pid, "peer": backend.proc.pid}
            before = self.probe("parked-haproxy-0", haproxy.port_cycles, None, pids)
            detail["haproxy"]["latency_0"] = before
            time.sleep(0.5)
            base = usage(haproxy.pid)
            detail["haproxy"]["base"] = asdict(base)
            idle_agents: list[Agent] = []
            held = 0
            reached = 0
            for level in scale.parked:
                target = min(level, HAPROXY_IDLE_MAX)
                while held < target:
                    n = min(AGENT_MAX, target - held)
                    held += n
                    idle_agents.append(self.agent(
                        running, f"idle-{len(idle_agents)}", "idle", "--port", haproxy.port_idle,
                        "--tls", "--count", n, "--ramp", 48))
                self.wait_open(idle_agents, held)
                reading = self.settled_usage(haproxy.pid, base.fds + held)
                figure = self.per_connection(reading, base, held)
                figure["measured_at"] = held
                detail["haproxy"][str(level)] = figure
                reached = held
                self.say(f"  haproxy {held:>6} idle:   {self.level_text(figure)}")
            after = self.probe("parked-haproxy-top", haproxy.port_cycles, None, pids)
            detail["haproxy"]["latency_top"] = after
            self.say(f"  haproxy new-connection p50 {before['p50_ms']:.2f} ms with 0 idle, "
                     f"{after['p50_ms']:.2f} ms with {reached} idle")
        self.parked_rows(detail)

    def settled_usage(self, pid: int, fds: int) -> procs.Usage:
        """A reading once the process holds ``fds`` descriptors and its memory stopped growing."""
        deadline = time.monotonic() + 30
        last = usage(pid)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = usage(pid)
            if now.fds >= fds and now.rss_kb == last.rss_kb:
                return now
            last = now
        self.warn(f"process {pid} did not settle at {fds} descriptors ({last.fds} held)")
        return last

    def per_connection(self, reading: procs.Usage, base: procs.Usage, n: int) -> dict[str, Any]:
        return {
            "connections": n,
            "rss_mb": reading.rss_kb / 1024,
            "fds": reading.fds,
            "rss_kb_per_connection": (reading.rss_kb - base.rss_kb) / n,
            "fds_per_connection": (reading.fds - base.fds) / n,
        }

    @staticmethod
    def level_text(figure: dict[str, Any]) -> str:
        return (f"RSS {figure['rss_mb']:7.1f} MB, {figure['rss_kb_per_connection']:5.1f} KB "
                f"and {figure['fds_per_connection']:.3f} descriptors per connection")

    # ------------------------------------------------------------------------- rows

    def traffic_rows(self, mode: str, detail: dict[str, Any]) -> None:
        name = "TLS" if mode == "tls" else "plain"
        for c, results in detail["cycles"].items():
            o, h = results["ours"], results["haproxy"]
            d = results.get("direct", {})
            what = "sequential" if c == "1" else f"{c} concurrent"
            key = f"{mode}.cycles.c{c}"
            pairing_floor = detail["floor"]["pairing_ms"] if "floor" in detail else None
            self.rows += [
                Row(f"{key}.rate", mode, f"{name} pairing cycles/s, {what}", "/s",
                    o["rate"], h["rate"], direct=d.get("rate")),
                Row(f"{key}.p50", mode, f"{name} mobile latency p50, {what}", "ms",
                    o["p50_ms"], h["p50_ms"], "lower", d.get("p50_ms")),
                Row(f"{key}.p99", mode, f"{name} mobile latency p99, {what}", "ms",
                    o["p99_ms"], h["p99_ms"], "lower", d.get("p99_ms")),
                Row(f"{key}.cpu", mode, f"{name} relay CPU per cycle, {what}", "ms",
                    o["relay_cpu_ms_per_cycle"], h["relay_cpu_ms_per_cycle"], "lower",
                    floor=pairing_floor),
            ]
        for figure, results in detail["bulk"].items():
            o, h = results["ours"], results["haproxy"]
            d = results.get("direct", {})
            key = f"{mode}.bulk.{figure.replace(' ', '')}"
            label = f"{figure}, 1 pairing" if figure != "4 pairings" else "down, 4 pairings"
            self.rows += [
                Row(f"{key}.mbs", mode, f"{name} bulk {label}", "MB/s", o["mb_s"], h["mb_s"],
                    direct=d.get("mb_s")),
                Row(f"{key}.cpu", mode, f"{name} bulk {label}: relay CPU", "s/GB",
                    o["relay_cpu_s_per_gb"], h["relay_cpu_s_per_gb"], "lower"),
            ]

    def parked_rows(self, detail: dict[str, Any]) -> None:
        ours, haproxy = detail["ours"], detail["haproxy"]
        for level in self.scale.parked:
            o, h = ours[str(level)], haproxy[str(level)]
            note = "" if h["measured_at"] == level else f"haproxy at {h['measured_at']}"
            self.rows += [
                Row(f"parked.{level}.rss", "parked", f"RSS per parked connection, {level} parked",
                    "KB", o["rss_kb_per_connection"], h["rss_kb_per_connection"], "lower",
                    note=note),
                Row(f"parked.{level}.fds", "parked",
                    f"descriptors per parked connection, {level} parked", "fds",
                    o["fds_per_connection"], h["fds_per_connection"], "lower", note=note),
                Row(f"parked.{level}.total", "parked", f"RSS of the relay, {level} parked", "MB",
                    o["rss_mb"], h["rss_mb"], "lower", note=note),
            ]
        top = max(self.scale.parked)
        h_top = haproxy[str(top)]["measured_at"]
        self.rows += [
            Row("parked.latency0.p50", "parked", "pairing p50, ~0 parked", "ms",
                ours["latency_0"]["p50_ms"], haproxy["latency_0"]["p50_ms"], "lower"),
            Row("parked.latencytop.p50", "parked", f"pairing p50, {top} parked", "ms",
                ours["latency_top"]["p50_ms"], haproxy["latency_top"]["p50_ms"], "lower",
                note="" if h_top == top else f"haproxy with {h_top} idle"),
            Row("parked.latency0.cpu", "parked", "relay CPU per pairing, ~0 parked", "ms",
                ours["latency_0"]["relay_cpu_ms_per_cycle"],
                haproxy["latency_0"]["relay_cpu_ms_per_cycle"], "lower"),
            Row("parked.latencytop.cpu", "parked", f"relay CPU per pairing, {top} parked", "ms",
                ours["latency_top"]["relay_cpu_ms_per_cycle"],
                haproxy["latency_top"]["relay_cpu_ms_per_cycle"], "lower",
                note="" if h_top == top else f"haproxy with {h_top} idle"),
        ]

    # ------------------------------------------------------------------------- targets

    def traffic_targets(self, mode: str, detail: dict[str, Any]) -> None:
        bulk = detail["bulk"]
        goal = 0.8 if mode == "tls" else 1.0
        for figure in ("down", "up", "both"):
            ratio = bulk[figure]["ours"]["mb_s"] / bulk[figure]["haproxy"]["mb_s"]
            self.targets.append(Target(
                f"{mode} bulk through 1 pairing, {figure}: ours/haproxy MB/s", ratio,
                f">= {goal:.2f}x", ratio >= goal, f"{mode}-bulk-{figure}"))
        if mode != "tls":
            return
        c50 = detail["cycles"]["50"]
        ratio = c50["ours"]["rate"] / c50["haproxy"]["rate"]
        self.targets.append(Target("TLS pairing cycles, 50 concurrent: ours/haproxy cycles/s",
                                   ratio, ">= 0.85x", ratio >= 0.85, "tls-cycles-c50"))
        vs_original = c50["ours"]["rate"] / ORIGINAL_CYCLES
        self.targets.append(Target(
            f"TLS pairing cycles, 50 concurrent: ours / original ({ORIGINAL_CYCLES:.0f}/s, "
            "the issue's figure)", vs_original, ">= 4x", vs_original >= 4, "tls-cycles-c50",
            note="the original is not run here"))
        seq = detail["cycles"]["1"]
        ratio = seq["ours"]["p50_ms"] / seq["haproxy"]["p50_ms"]
        self.targets.append(Target("TLS sequential pairing: mobile p50 ours/haproxy", ratio,
                                   "<= 1.30x", ratio <= 1.3, "tls-cycles-c1"))

    def pairing_targets(self, mode: str, detail: dict[str, Any]) -> None:
        """Issue #15's: what a pairing costs against haproxy's connection, against the floor
        of its two TLS handshakes, and what following HTTP costs a bulk transfer."""
        name = "TLS" if mode == "tls" else "plain"
        cycles = detail["cycles"]
        cpu_goal, rate_goal = (1.0, 1.0) if mode == "tls" else (2.0, 0.8)
        for c, what in (("1", "sequential"), ("50", "50 concurrent")):
            ours, haproxy = cycles[c]["ours"], cycles[c]["haproxy"]
            ratio = ours["relay_cpu_ms_per_cycle"] / haproxy["relay_cpu_ms_per_cycle"]
            self.targets.append(Target(
                f"{name} relay CPU per pairing, {what}: ours/haproxy", ratio,
                f"<= {cpu_goal:.2f}x", ratio <= cpu_goal, f"{mode}-cycles-c{c}", issue="#15"))
        c50 = cycles["50"]
        ratio = c50["ours"]["rate"] / c50["haproxy"]["rate"]
        self.targets.append(Target(
            f"{name} pairing cycles/s, 50 concurrent: ours/haproxy", ratio,
            f">= {rate_goal:.2f}x", ratio >= rate_goal, f"{mode}-cycles-c50", issue="#15"))
        if "floor" in detail:
            pairing_floor = detail["floor"]["pairing_ms"]
            for c, what in (("1", "sequential"), ("50", "50 concurrent")):
                ours, haproxy = cycles[c]["ours"], cycles[c]["haproxy"]
                ratio = ours["relay_cpu_ms_per_cycle"] / pairing_floor
                theirs = haproxy["relay_cpu_ms_per_cycle"] / pairing_floor
                self.targets.append(Target(
                    f"TLS relay CPU per pairing, {what}: ours / floor ({pairing_floor:.2f} ms, "
                    "two server handshakes)", ratio, "<= 1.50x", ratio <= 1.5,
                    f"tls-cycles-c{c}", issue="#15", note=f"haproxy: {theirs:.2f}x"))
        framed, raw = detail["bulk"]["down"]["ours"], detail["bulk"]["down raw"]["ours"]
        ratio = framed["mb_s"] / raw["mb_s"]
        cpu = framed["relay_cpu_s_per_gb"] / raw["relay_cpu_s_per_gb"]
        self.targets.append(Target(
            f"{name} bulk down, framed (per-request routing) / raw (101): ours MB/s", ratio,
            ">= 0.90x", ratio >= 0.9, f"{mode}-bulk-down", issue="#15",
            note=f"CPU per GB framed/raw {cpu:.2f}x"))

    def parked_targets(self, detail: dict[str, Any], top: int) -> list[Target]:
        ours = detail["ours"]
        found = [
            Target(f"parked: RSS per connection at {top} parked",
                   ours[str(top)]["rss_kb_per_connection"], "<= 30 KB",
                   ours[str(top)]["rss_kb_per_connection"] <= 30, "parked-memory", "KB"),
            Target(f"parked: descriptors per connection at {top} parked",
                   ours[str(top)]["fds_per_connection"], "= 1",
                   abs(ours[str(top)]["fds_per_connection"] - 1) < 0.01, "parked-fds", "fds"),
        ]
        ratio = ours["latency_top"]["p50_ms"] / ours["latency_0"]["p50_ms"]
        found.append(Target(f"parked: pairing p50 at {top} parked / at ~0 parked", ratio,
                            "<= 1.25x (unchanged)", ratio <= 1.25, "parked-latency"))
        self.targets += found
        return found

    # ------------------------------------------------------------------------- profiles

    def profile_misses(self, pid: int, workloads: dict[str, Callable[[float], None]]) -> None:
        """py-spy on our relay while the phase of each missed target runs again."""
        if not self.do_profile:
            return
        for target in self.targets:
            if target.passed or target.profile or target.phase not in workloads:
                continue
            same = next((t.profile for t in self.targets if t.phase == target.phase
                         and t.profile), None)
            target.profile = same or self.profile(target.phase, pid, workloads[target.phase])

    def profile(self, phase: str, pid: int, workload: Callable[[float], None]) -> str:
        seconds = self.scale.profile_seconds
        self.say(f"  profiling our relay (py-spy, {seconds:.0f} s) during {phase}")
        raw = self.work / f"profile-{phase}.raw"
        profiler = procs.Profiler(pid, seconds, raw)
        try:
            workload(seconds)
        finally:
            profiler.finish()
        from bench.profile import summarize

        title = (f"py-spy record --native --rate {profiler.rate} on our relay (pid {pid}) during "
                 f"{phase}, {self.scale.name} run of {datetime.date.today()}")
        path = self.out / f"profile-{phase}.txt"
        path.write_text(summarize(raw, title, seconds, profiler.rate))
        return path.name

    def explain_parked_misses(self, pid: int, targets: list[Target], probe_file: str,
                              port: int) -> None:
        """A memory or descriptor miss: save what /proc says; a latency miss: a profile."""
        if not self.do_profile:
            return
        for target in targets:
            if target.passed:
                continue
            if target.phase == "parked-latency":
                def probe(seconds: float) -> None:
                    with procs.agents() as extra:
                        mobile = self.agent(extra, "profile-probe", "mobile", "--port", port,
                                            "--tls", "--ids", probe_file, "--concurrency", 1,
                                            "--count", 1_000_000, "--warmup", 0,
                                            "--seconds", seconds)
                        mobile.result(seconds + 60)
                target.profile = self.profile("parked-latency", pid, probe)
                continue
            path = self.out / f"profile-{target.phase}.txt"
            text = [f"{target.name}: {target.measured:.3f} {target.unit} (goal {target.goal})",
                    "", f"/proc/{pid}/smaps_rollup:"]
            with contextlib.suppress(OSError):
                text.append(Path(f"/proc/{pid}/smaps_rollup").read_text())
            kinds: dict[str, int] = {}
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        kind = link.split(":")[0] if ":" in link else "file"
                        kinds[kind] = kinds.get(kind, 0) + 1
            text += ["descriptors by kind: " + json.dumps(kinds)]
            path.write_text("\n".join(text) + "\n")
            target.profile = path.name

    # ------------------------------------------------------------------------- output

    def results(self, started: datetime.datetime, seconds: float) -> dict[str, Any]:
        cipher = None
        with contextlib.suppress(KeyError, TypeError):
            cipher = self.details["tls"]["cycles"]["1"]["ours"]["cipher"]
        return {
            "schema": 1,
            "mode": self.scale.name,
            "started": started.isoformat(timespec="seconds"),
            "duration_s": round(seconds, 1),
            "machine": machine_facts(),
            "settings": {
                "scale": asdict(self.scale),
                "relay_flags": RELAY_FLAGS,
                "haproxy_threads": self.haproxy_threads,
                "haproxy_version": procs.haproxy_version(procs.ensure_haproxy()),
                "tls_cipher_seen": cipher,
            },
            "rows": [asdict(r) for r in self.rows],
            "targets": [asdict(t) for t in self.targets],
            "extra_profiles": self.extra_profiles,
            "details": self.details,
            "warnings": self.warnings,
        }


def machine_facts() -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "nofile_hard": hard,
    }


def wait_for_quiet(limit: float, most: float) -> float:
    """Wait up to ``limit`` seconds for processes to use under ``most`` cores; the last load."""
    deadline = time.monotonic() + limit
    while True:
        before = procs.busy_seconds()
        time.sleep(1.0)
        load = procs.busy_seconds() - before
        if load < most or time.monotonic() > deadline:
            return load


def check_tools(chart: bool) -> None:
    procs.ensure_haproxy()
    if procs.py_spy() is None:
        print("note: py-spy is missing, so misses will not be profiled: "
              ".venv/bin/pip install -e '.[bench]'", file=sys.stderr)
    if chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("note: matplotlib is missing, so no chart: .venv/bin/pip install -e '.[bench]'",
                  file=sys.stderr)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rendezvous-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"work folder kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small counts, under a minute")
    size.add_argument("--tiny", action="store_true", help="the smallest counts (the test suite)")
    parser.add_argument("--out", type=Path,
                        help="folder for latest.json, chart.png and profiles (default: "
                        "bench/results, or bench/results/quick for --quick and --tiny, so a "
                        "small run never replaces the full run's files)")
    parser.add_argument("--no-profile", action="store_true", help="do not profile misses")
    parser.add_argument("--no-chart", action="store_true", help="do not draw chart.png")
    parser.add_argument("--only", choices=("tls", "plain", "parked"), action="append",
                        help="run only these groups (repeatable; default: all)")
    parser.add_argument("--haproxy-threads", type=int, default=1,
                        help="haproxy's nbthread; 1 matches our single-threaded relay "
                        "(default: %(default)s)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for other processes to go quiet")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    scale = SCALES["quick" if args.quick else "tiny" if args.tiny else "full"]
    if args.out is None:
        args.out = RESULTS if scale.name == "full" else RESULTS / "quick"
    groups = args.only or ["tls", "plain", "parked"]
    raise_nofile()
    check_tools(not args.no_chart)
    args.out.mkdir(parents=True, exist_ok=True)
    load = wait_for_quiet(args.wait_quiet, 0.2) if args.wait_quiet else 0.0
    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    print(f"rendezvous bench, {scale.name} run: our relay (python -m rendezvous serve) vs "
          f"haproxy ({procs.haproxy_version(procs.ensure_haproxy())}, nbthread "
          f"{args.haproxy_threads}); results to {args.out}")
    with workdir(args.keep) as work:
        bench = Bench(scale, args.out, work, not args.no_profile, not args.no_chart,
                      args.haproxy_threads)
        if load > 0.2:
            bench.warn(f"the machine was busy before the run ({load:.2f} cores)")
        try:
            for group in ("tls", "plain", "parked"):
                if group in groups:
                    t_group = time.monotonic()
                    if group == "parked":
                        bench.parked()
                    else:
                        bench.traffic(tls=group == "tls")
                    print(f"  ({group}: {time.monotonic() - t_group:.0f} s)", flush=True)
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            if not args.keep:
                print(f"(logs are in {work}; rerun with --keep to keep them)", file=sys.stderr)
            return 1
        results = bench.results(started, time.monotonic() - t0)
    tmp = args.out / "latest.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out / "latest.json")
    print()
    print(report.table(results))
    if not args.no_chart:
        chart = report.chart(results, args.out / "chart.png")
        print(f"chart: {chart}" if chart else "chart: skipped (pip install matplotlib)")
    print(f"results: {args.out / 'latest.json'}  ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
