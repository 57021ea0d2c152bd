"""``rendezvous status``: what the running relay holds, per hidden server, for a terminal.

The relay answers on the Unix socket it names in DATA_DIR/relay.json (server/local.py); labels
come from the registry, as on the admin page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from rendezvous import registrar
from rendezvous.cli.options import Commands, Formatter, err, store, store_options
from rendezvous.cli.users import one_line
from rendezvous.errors import ConfigError, RendezvousError
from rendezvous.registry import Entry, Registry


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Add ``status`` to ``commands``."""
    p = commands.add_parser(
        "status",
        parents=[store_options()],
        formatter_class=Formatter,
        help="show the running relay: parked and active connections per hidden server",
        description="Ask the relay running with this data folder for its live numbers: per\n"
        "hidden server its parked and active connections, pairings, bytes and when it was\n"
        "last seen (what the admin page shows), and the relay's totals.",
        epilog="Exit status: 0 when the relay answered; 2 when none runs with this data folder.",
    )
    p.add_argument("--json", action="store_true", help="print the relay's JSON document")
    p.add_argument("--socket", type=Path, metavar="PATH",
                   help="the relay's status socket (default: the one DIR/relay.json names)")
    p.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    found = store(args)
    path: Path | None = args.socket
    if path is None:
        record = registrar.recall_relay(found.data_dir)
        if record is None:
            raise ConfigError(f"no relay has started with data folder {found.data_dir} (no "
                              f"{registrar.RELAY_RECORD} there): pass --data-dir")
        if record.status_socket is None:
            raise ConfigError(f"the relay of {found.data_dir} opened no status socket (see "
                              "its log)")
        path = record.status_socket
    # Imported here: the relay's side lives there too, beside what it sends.
    from rendezvous.server.local import ask_relay

    status = ask_relay(path)
    labels = _labels(found.registry_url)
    ids: dict[str, dict[str, Any]] = status["ids"]
    for uuid, label in labels.items():
        ids.setdefault(uuid, {"parked": 0, "active": 0, "pairings": 0, "bytes": 0,
                              "last_seen": 0.0})
        ids[uuid]["label"] = label
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    _print(status, ids)
    return 0


def _labels(url: str) -> dict[str, str]:
    """Every registry entry's label by ID; empty (with a note) when the registry fails."""

    async def op(registry: Registry) -> list[Entry]:
        return await registry.list()

    try:
        return {e.uuid: e.label for e in registrar.with_registry(url, op)}
    except RendezvousError as exc:
        err(f"note: no labels: {exc}")
        return {}


def _print(status: dict[str, Any], ids: dict[str, dict[str, Any]]) -> None:
    relay = status.get("relay") or {}
    now = float(status.get("now") or time.time())
    listening = ", ".join(status.get("listening") or ()) or "?"
    up = _ago(float(status.get("started") or 0), now).removesuffix(" ago")
    print(f"relay on {listening} (pid {status.get('pid', '?')}, up {up}): "
          f"{relay.get('parked', 0)} parked, {relay.get('active', 0)} active, "
          f"{relay.get('pairings', 0)} pairings, {_bytes(relay.get('bytes', 0))}, "
          f"{relay.get('rejections_total', 0)} rejections")
    cluster = status.get("cluster")
    if cluster:
        print(f"cluster: links out {cluster.get('links', 0)} (opened "
              f"{cluster.get('links_opened', 0)}), in {cluster.get('links_in', 0)}; forwarded "
              f"clients out {cluster.get('streams_out', 0)}, in {cluster.get('streams_in', 0)}; "
              f"remembered routes taken {cluster.get('route_hits', 0)}, refused "
              f"{cluster.get('route_misses', 0)}")
    rows = [("ID", "LABEL", "PARKED", "ACTIVE", "PAIRINGS", "BYTES", "LAST SEEN")]
    for uuid in sorted(ids, key=lambda u: (-float(ids[u].get("last_seen") or 0), u)):
        n = ids[uuid]
        rows.append((uuid, one_line(str(n.get("label", ""))), str(n.get("parked", 0)),
                     str(n.get("active", 0)), str(n.get("pairings", 0)),
                     _bytes(n.get("bytes", 0)), _ago(float(n.get("last_seen") or 0), now)))
    if len(rows) == 1:
        print("no hidden server has parked since the relay started, and the registry is empty")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def _bytes(count: Any) -> str:
    value = float(count or 0)
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"


def _ago(moment: float, now: float) -> str:
    if not moment:
        return "never"
    seconds = max(0, int(now - moment))
    with contextlib.suppress(OverflowError):
        for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
            if seconds >= size:
                return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"
