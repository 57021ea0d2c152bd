"""The printed table and the PNG chart, both drawn from the results JSON alone.

    python -m bench.report [RESULTS.json]             the table again
    python -m bench.report --markdown [RESULTS.json]  the same as Markdown (for bench/README.md)
    python -m bench.report --chart [RESULTS.json]     redraw chart.png beside the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GROUP_TITLES = {
    "tls": "TLS on both legs (relay) / both sides (haproxy)",
    "plain": "plain TCP: our relay --no-tls vs haproxy plain",
    "parked": "parked connections (TLS): our relay vs haproxy idle connections",
}


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _floor(row: dict[str, Any]) -> str:
    """The floor column: the two TLS handshakes' CPU, and ours as a multiple of it."""
    floor = row.get("floor")
    if not floor:
        return "-"
    return f"{_number(floor)} ({row['ours'] / floor:.2f}x)"


def table(results: dict[str, Any]) -> str:
    """Every figure with the ratio ours/haproxy, then the targets with PASS/MISS."""
    lines = []
    width = max((len(r["figure"]) + len(r["unit"]) + 3 for r in results["rows"]), default=40)
    header = (f"{'figure':<{width}} {'ours':>10} {'haproxy':>10} {'ours/hap':>9} "
              f"{'no relay':>10} {'floor (ours/floor)':>19}")
    for group in ("tls", "plain", "parked"):
        rows = [r for r in results["rows"] if r["group"] == group]
        if not rows:
            continue
        lines += ["", f"-- {GROUP_TITLES[group]}", header]
        for r in rows:
            name = f"{r['figure']} ({r['unit']})"
            better = "" if r["better"] == "higher" else " (lower is better)"
            note = f"  [{r['note']}]" if r["note"] else ""
            lines.append(f"{name:<{width}} {_number(r['ours']):>10} {_number(r['haproxy']):>10} "
                         f"{r['ratio']:>8.2f}x {_number(r['direct']):>10} {_floor(r):>19}"
                         f"{better}{note}")
    if results["targets"]:
        lines += ["", "-- targets (issue #5, and #15's marked #15)"]
        name_width = max(len(t["name"]) + len(_issue(t)) for t in results["targets"])
        for t in results["targets"]:
            name = _issue(t) + t["name"]
            unit = "x" if t["unit"] == "x" else f" {t['unit']}"
            verdict = "PASS" if t["passed"] else "MISS"
            extra = f"  profile: {t['profile']}" if t["profile"] else ""
            note = f"  ({t['note']})" if t["note"] else ""
            lines.append(f"{name:<{name_width}}  {t['measured']:8.2f}{unit:<4} "
                         f"goal {t['goal']:<20} {verdict}{extra}{note}")
    for phase, name in results.get("extra_profiles", {}).items():
        lines.append(f"(no target) profile of our relay during {phase}: {name}")
    busy = [w for w in results["warnings"] if "other processes used" in w]
    rest = [w for w in results["warnings"] if w not in busy]
    if busy or rest:
        lines += ["", "-- warnings"] + [f"  {w}" for w in rest]
    if busy:
        cores = sorted(float(w.split(" used ")[1].split()[0]) for w in busy)
        lines.append(f"  {len(busy)} runs shared the machine with other processes (up to "
                     f"{cores[-1]:.2f} cores, median {cores[len(cores) // 2]:.2f}): see "
                     "\"warnings\" and each figure's other_cpu_cores in the JSON")
    return "\n".join(lines)


def _issue(target: dict[str, Any]) -> str:
    issue = target.get("issue", "#5")
    return "" if issue == "#5" else f"{issue}: "


def x_ticks(ax: Any, values: list[int]) -> None:
    """Log-scaled x axis labelled with exactly the measured points."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    if values:
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:,}" for v in values])
    ax.xaxis.set_minor_locator(NullLocator())


def legend(ax: Any) -> None:
    """A legend, when the panel has anything to label (a partial run leaves some empty)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """Throughput and latency against concurrency, bulk MB/s, parked memory; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    details = results["details"]
    colors = {"ours": "tab:blue", "haproxy": "tab:orange", "direct": "tab:gray"}
    labels = {"ours": "our relay", "haproxy": "haproxy 2.6", "direct": "no relay"}
    fig, grid = plt.subplots(2, 3, figsize=(19, 9))
    axes = [grid[0][:2], grid[1][:2]]
    fig.suptitle(f"rendezvous relay vs haproxy ({results['mode']} run, "
                 f"{results['started'][:10]}, {results['machine']['cpus']} cores)")

    ax = axes[0][0]
    for mode, style in (("tls", "-"), ("plain", ":")):
        cycles = details.get(mode, {}).get("cycles", {})
        xs = sorted(int(c) for c in cycles)
        for system in ("ours", "haproxy", "direct"):
            if not xs or any(system not in cycles[str(c)] for c in xs):
                continue
            ys = [cycles[str(c)][system]["rate"] for c in xs]
            ax.plot(xs, ys, style, marker="o", color=colors[system],
                    label=f"{labels[system]}, {'TLS' if mode == 'tls' else 'plain'}")
    ax.set_yscale("log")
    x_ticks(ax, sorted({int(c) for m in ("tls", "plain")
                        for c in details.get(m, {}).get("cycles", {})}))
    ax.set_xlabel("concurrent mobile clients")
    ax.set_ylabel("pairing cycles / s (haproxy: connections / s)")
    ax.set_title("Pairing cycles: throughput")
    ax.grid(True, alpha=0.3)
    legend(ax)

    ax = axes[0][1]
    cycles = details.get("tls", {}).get("cycles", {})
    xs = sorted(int(c) for c in cycles)
    for system in ("ours", "haproxy", "direct"):
        if not xs or any(system not in cycles[str(c)] for c in xs):
            continue
        for pct, style in (("p50_ms", "-"), ("p99_ms", "--")):
            ys = [cycles[str(c)][system][pct] for c in xs]
            ax.plot(xs, ys, style, marker="o", color=colors[system],
                    label=f"{labels[system]} {pct[:3]}")
    x_ticks(ax, xs)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent mobile clients")
    ax.set_ylabel("mobile-side latency, ms")
    ax.set_title("Pairing cycles (TLS): latency, connect to full answer")
    ax.grid(True, alpha=0.3, which="both")
    legend(ax)

    ax = axes[1][0]
    names: list[str] = []
    values: dict[str, list[float]] = {"ours": [], "haproxy": [], "direct": []}
    for mode in ("tls", "plain"):
        for figure, by_system in details.get(mode, {}).get("bulk", {}).items():
            names.append(f"{'TLS' if mode == 'tls' else 'plain'}\n{figure}")
            for system in values:
                values[system].append(by_system[system]["mb_s"] if system in by_system else 0.0)
    width = 0.27
    for i, system in enumerate(values):
        if not any(values[system]):
            continue
        xs_bar = [n + (i - 1) * width for n in range(len(names))]
        ax.bar(xs_bar, values[system], width, color=colors[system], label=labels[system])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("MB/s (both directions counted)")
    ax.set_title("Bulk through pairings (1 pairing unless marked)")
    ax.grid(True, axis="y", alpha=0.3)
    legend(ax)

    ax = axes[1][1]
    parked = details.get("parked", {})
    levels: set[int] = set()
    for system in ("ours", "haproxy"):
        points = sorted((v["connections"], v["rss_kb_per_connection"], v["rss_mb"])
                        for k, v in parked.get(system, {}).items() if k.isdigit())
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                color=colors[system], label=f"{labels[system]}: KB per connection")
        for count, kb, mb in points:
            levels.add(count)
            ax.annotate(f"{mb:.0f} MB", (count, kb), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=7, color=colors[system])
    ax.axhline(30, color="tab:red", linestyle="--", linewidth=1, label="target: 30 KB")
    x_ticks(ax, sorted(levels))
    ax.set_xlabel("parked (haproxy: idle TLS) connections")
    ax.set_ylabel("RSS growth per connection, KB")
    ax.set_title("Parked connections: memory (labels: the relay's total RSS)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    legend(ax)

    cpu_panel(grid[0][2], details)
    routing_panel(grid[1][2], details)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cpu_panel(ax: Any, details: dict[str, Any]) -> None:
    """Relay CPU per pairing cycle at each concurrency: ours, haproxy's per connection, and
    (TLS) the floor of the pairing's two server handshakes."""
    colors = {"ours": "tab:blue", "haproxy": "tab:orange"}
    labels: list[str] = []
    bars: dict[str, list[float]] = {"ours": [], "haproxy": []}
    floors: list[float] = []
    for mode in ("tls", "plain"):
        group = details.get(mode, {})
        for c in sorted(group.get("cycles", {}), key=int):
            by_system = group["cycles"][c]
            labels.append(f"{'TLS' if mode == 'tls' else 'plain'}\n{'seq' if c == '1' else c}")
            for system in bars:
                bars[system].append(by_system.get(system, {}).get("relay_cpu_ms_per_cycle", 0))
            floors.append(group["floor"]["pairing_ms"] if "floor" in group else 0.0)
    width = 0.27
    for i, (system, name) in enumerate((("ours", "our relay"), ("haproxy", "haproxy 2.6"))):
        ax.bar([n + (i - 1) * width for n in range(len(labels))], bars[system], width,
               color=colors[system], label=name)
    if any(floors):
        ax.bar([n + width for n in range(len(labels))], floors, width, color="tab:green",
               label="floor: 2 server TLS handshakes")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("relay CPU ms per pairing (haproxy: per connection)")
    ax.set_title("CPU per pairing: ours, haproxy, floor (lower is better)")
    ax.grid(True, axis="y", alpha=0.3)
    legend(ax)


def routing_panel(ax: Any, details: dict[str, Any]) -> None:
    """Our relay's bulk download following HTTP (per-request routing) against the same bytes
    after a 101 (raw)."""
    labels: list[str] = []
    framed: list[float] = []
    raw: list[float] = []
    for mode in ("tls", "plain"):
        bulk = details.get(mode, {}).get("bulk", {})
        if "down" in bulk and "down raw" in bulk:
            labels.append("TLS" if mode == "tls" else "plain")
            framed.append(bulk["down"]["ours"]["mb_s"])
            raw.append(bulk["down raw"]["ours"]["mb_s"])
    width = 0.35
    ax.bar([n - width / 2 for n in range(len(labels))], framed, width, color="tab:blue",
           label="framed (Content-Length, routed)")
    ax.bar([n + width / 2 for n in range(len(labels))], raw, width, color="tab:cyan",
           label="raw (after 101)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("MB/s, our relay, 1 pairing down")
    ax.set_title("What following HTTP costs a bulk download")
    ax.grid(True, axis="y", alpha=0.3)
    legend(ax)


def markdown(results: dict[str, Any]) -> str:
    """The figures and targets as Markdown tables."""
    lines = []
    for group in ("tls", "plain", "parked"):
        rows = [r for r in results["rows"] if r["group"] == group]
        if not rows:
            continue
        floors = any(r.get("floor") for r in rows)
        lines += ["", f"**{GROUP_TITLES[group]}**", "",
                  "| figure | ours | haproxy | ours/haproxy | no relay |"
                  + (" floor (ours/floor) |" if floors else ""),
                  "|---|---:|---:|---:|---:|" + ("---:|" if floors else "")]
        for r in rows:
            better = " (lower is better)" if r["better"] == "lower" else ""
            note = f" [{r['note']}]" if r["note"] else ""
            lines.append(f"| {r['figure']} ({r['unit']}){better}{note} | {_number(r['ours'])} | "
                         f"{_number(r['haproxy'])} | {r['ratio']:.2f}x | "
                         f"{_number(r['direct'])} |" + (f" {_floor(r)} |" if floors else ""))
    if results["targets"]:
        lines += ["", "| target | issue | measured | goal | verdict | profile |",
                  "|---|---|---:|---|---|---|"]
        for t in results["targets"]:
            unit = "x" if t["unit"] == "x" else f" {t['unit']}"
            verdict = "PASS" if t["passed"] else "**MISS**"
            profile = f"[{t['profile']}](results/{t['profile']})" if t["profile"] else ""
            note = f" ({t['note']})" if t.get("note") else ""
            lines.append(f"| {t['name']}{note} | {t.get('issue', '#5')} | {t['measured']:.2f}{unit}"
                         f" | {t['goal']} | {verdict} | {profile} |")
    return "\n".join(lines).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "latest.json")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--chart", action="store_true")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if args.chart:
        drawn = chart(results, args.results.parent / "chart.png")
        print(drawn or "matplotlib is missing: .venv/bin/pip install -e '.[bench]'")
        return 0 if drawn else 1
    print(markdown(results) if args.markdown else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
