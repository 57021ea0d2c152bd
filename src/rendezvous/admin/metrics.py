"""``/metrics``: the relay's numbers in Prometheus's text format.

A custom collector reads the hub's own counters when Prometheus scrapes, so metrics add no work
to the relay (its counters are updated at park, pairing and close, never per chunk). Scrapes run
on the relay's event loop, like every change to those counters, so they need no lock.

Series (``rendezvous_`` prefix):

    parked_connections              gauge    connections parked now
    id_parked_connections{id}       gauge    the same per ID (only with --metrics-per-id)
    active_pairings                 gauge    pairings relaying now
    open_connections                gauge    accepted connections not yet closed (those
                                             in their TLS handshake too)
    parks_total                     counter  connections parked since start
    pairings_total                  counter  pairings started since start
    rejections_total{reason}        counter  refused peers, by reason
    relayed_bytes_total{direction}  counter  bytes of closed pairings, mobile_to_hidden or
                                             hidden_to_mobile
    pairing_latency_seconds         histogram  from a client's request head to its pairing
    registry_errors_total           counter  failed registry calls (relay lookups, this page)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from rendezvous.admin.state import AdminState

PREFIX = "rendezvous"
# Rejection reasons carry details after ": " (an exception's text): cut them off, and bound the
# number of distinct labels, so a stream of odd requests cannot flood Prometheus with series.
MAX_REASONS = 50
OTHER_REASON = "other"
REGISTRY_ERROR_REASON = "registry error"


def reason_label(reason: str) -> str:
    """The label value for a rejection reason: its text before any ``": "`` detail."""
    return reason.split(": ", 1)[0].strip() or OTHER_REASON


def reason_counts(rejections: Counter[str]) -> dict[str, int]:
    """Rejections by label value, at most MAX_REASONS of them (the rest under ``other``)."""
    merged: Counter[str] = Counter()
    for reason, count in rejections.items():
        merged[reason_label(reason)] += count
    if len(merged) <= MAX_REASONS:
        return dict(merged)
    kept = dict(merged.most_common(MAX_REASONS - 1))
    kept[OTHER_REASON] = kept.get(OTHER_REASON, 0) + sum(
        count for label, count in merged.items() if label not in kept
    )
    return kept


class RelayCollector(Collector):
    """Reads the hub (when there is one) and the admin page's own counters at scrape time."""

    def __init__(self, state: AdminState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        state = self.state
        hub = state.hub
        relay_registry_errors = 0
        if hub is not None:
            stats = hub.stats
            yield GaugeMetricFamily(
                f"{PREFIX}_parked_connections",
                "Hidden-server connections parked now, waiting for a mobile client.",
                value=hub.parked_count(),
            )
            if state.config.metrics_per_id:
                per_id = GaugeMetricFamily(
                    f"{PREFIX}_id_parked_connections",
                    "Connections parked now, per hidden-server ID.",
                    labels=["id"],
                )
                for uuid, parked in hub.pool_sizes().items():
                    per_id.add_metric([uuid], parked)
                yield per_id
            yield GaugeMetricFamily(
                f"{PREFIX}_active_pairings", "Pairings relaying bytes now.", value=hub.active_pairs
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_open_connections",
                "Accepted connections not yet closed.",
                value=hub.open_connections,
            )
            yield CounterMetricFamily(
                f"{PREFIX}_parks", "Connections parked since start.", value=stats.parked
            )
            yield CounterMetricFamily(
                f"{PREFIX}_pairings", "Pairings started since start.", value=stats.pairings
            )
            rejections = CounterMetricFamily(
                f"{PREFIX}_rejections", "Peers refused, by reason.", labels=["reason"]
            )
            for label, count in sorted(reason_counts(stats.rejections).items()):
                rejections.add_metric([label], count)
                if label == REGISTRY_ERROR_REASON:
                    relay_registry_errors = count
            yield rejections
            relayed = CounterMetricFamily(
                f"{PREFIX}_relayed_bytes",
                "Bytes relayed by closed pairings, by direction.",
                labels=["direction"],
            )
            relayed.add_metric(["mobile_to_hidden"], stats.bytes_up)
            relayed.add_metric(["hidden_to_mobile"], stats.bytes_down)
            yield relayed
            latency = stats.pairing_latency
            yield HistogramMetricFamily(
                f"{PREFIX}_pairing_latency_seconds",
                "Seconds from a mobile client's request head to the start of its pairing.",
                buckets=[(_bound(bound), count) for bound, count in latency.cumulative()],
                sum_value=latency.sum,
            )
            cluster = hub.cluster
            if cluster is not None:
                yield from _cluster_metrics(stats.forwarded, cluster.status())
        yield CounterMetricFamily(
            f"{PREFIX}_registry_errors",
            "Registry calls that failed: the relay's token lookups and the admin page's.",
            value=relay_registry_errors + state.registry_errors,
        )


def _cluster_metrics(forwarded: int, internal: dict[str, int]) -> Iterable[Metric]:
    """A node of a cluster: clients handed to other nodes, its internal links and streams."""
    yield CounterMetricFamily(
        f"{PREFIX}_cluster_forwarded", "Mobile clients handed to another node.", value=forwarded)
    for name, kind, text in (
        ("links_opened", CounterMetricFamily,
         "Internal links this node opened to other nodes (one TLS handshake each)."),
        ("links", GaugeMetricFamily, "Internal links this node has open to others now."),
        ("links_accepted", CounterMetricFamily,
         "Internal links other nodes opened to this one."),
        ("streams_out", CounterMetricFamily,
         "Forwarded clients this node sent to others, one stream each on a link."),
        ("streams_in", CounterMetricFamily,
         "Forwarded clients other nodes sent to this one."),
        ("route_hits", CounterMetricFamily,
         "Clients taken by the node that took their ID's last client (no Redis lookup)."),
        ("route_misses", CounterMetricFamily,
         "Clients refused by that node (nothing parked there any more): then Redis is asked."),
    ):
        yield kind(f"{PREFIX}_cluster_{name}", text, value=internal[name])


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def metrics_registry(state: AdminState) -> CollectorRegistry:
    """A registry of its own (not prometheus-client's global one) with our collector and the
    process's CPU, memory and open files."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(state))
    registry.register(ProcessCollector(registry=None))
    return registry
