"""``/metrics`` against a known sequence of parks, pairings and a refusal; ``/healthz`` and
``/readyz`` with a working registry, an unreachable one, and a relay that stopped listening."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import requests
from admin_support import HTTP_TIMEOUT, admin_config
from harness import ServerThread, recv_exactly, recv_until, running_server
from prometheus_client.parser import text_string_to_metric_families

from rendezvous.registry import Entry, open_registry

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


def scrape(s: ServerThread) -> Samples:
    """Every sample on /metrics, parsed by prometheus-client, keyed by name and labels."""
    answer = requests.get(s.admin_url() + "/metrics", timeout=HTTP_TIMEOUT)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    found: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_for(s: ServerThread, check: Callable[[Samples], bool], timeout: float = 5.0) -> Samples:
    """Scrape until ``check`` holds (closes reach the hub a moment after the peers close)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(s)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def pair_once(s: ServerThread, entry: Entry, hidden: socket.socket) -> tuple[int, int]:
    """One mobile request answered by the parked ``hidden``; bytes (up, down) as relayed."""
    with s.connect() as mobile:
        return _exchange(entry, hidden, mobile)


def _exchange(entry: Entry, hidden: socket.socket, mobile: socket.socket) -> tuple[int, int]:
    credentials = base64.b64encode(f"{entry.uuid}:x".encode()).decode()
    mobile.sendall(f"GET /status HTTP/1.1\r\nHost: hub\r\nAuthorization: Basic {credentials}"
                   "\r\n\r\n".encode())
    forwarded = recv_until(hidden, b"\r\n\r\n")
    assert forwarded.startswith(b"GET /status HTTP/1.1\r\n")
    hidden.sendall(RESPONSE)
    assert recv_exactly(mobile, len(RESPONSE)) == RESPONSE
    hidden.close()
    return len(forwarded), len(RESPONSE)


def test_metrics_count_parks_pairings_and_refusals(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path)) as s, ExitStack() as sockets:
        entry = s.add_entry()
        before = scrape(s)
        assert value(before, "rendezvous_parked_connections") == 0
        assert value(before, "rendezvous_pairing_latency_seconds_count") == 0
        assert not any(name == "rendezvous_id_parked_connections" for name, _ in before)

        # Park 3, pair 2 (a pool hands out its newest first), refuse 1.
        parked = [sockets.enter_context(s.park(entry)) for _ in range(3)]
        s.wait_parked(entry.uuid, 3)
        up = down = 0
        for hidden in parked[:0:-1]:
            sent_up, sent_down = pair_once(s, entry, hidden)
            up += sent_up
            down += sent_down
        wrong = sockets.enter_context(s.connect())
        wrong.sendall(f"CONNECT uuid:{entry.uuid}?response=000000 HTTP/1.1\r\n\r\n".encode())
        assert recv_exactly(wrong, 16) == b"HTTP/1.1 401\r\n\r\n"
        wrong.close()

        samples = wait_for(s, lambda m: m[("rendezvous_active_pairings", ())] == 0
                           and m[("rendezvous_open_connections", ())] == 1)
        assert value(samples, "rendezvous_parked_connections") == 1
        assert value(samples, "rendezvous_active_pairings") == 0
        assert value(samples, "rendezvous_open_connections") == 1
        assert value(samples, "rendezvous_parks_total") == 3
        assert value(samples, "rendezvous_pairings_total") == 2
        assert value(samples, "rendezvous_rejections_total", reason="wrong token") == 1
        assert sum(v for (name, _), v in samples.items()
                   if name == "rendezvous_rejections_total") == 1
        assert value(samples, "rendezvous_relayed_bytes_total", direction="mobile_to_hidden") == up
        assert value(samples, "rendezvous_relayed_bytes_total", direction="hidden_to_mobile") \
            == down
        assert value(samples, "rendezvous_pairing_latency_seconds_count") == 2
        assert value(samples, "rendezvous_pairing_latency_seconds_bucket", le="+Inf") == 2
        # Both found a connection parked: no wait beyond the loop's turn (its clock may not move).
        assert 0 <= value(samples, "rendezvous_pairing_latency_seconds_sum") < 1.0
        assert value(samples, "rendezvous_pairing_latency_seconds_bucket", le="1.0") == 2
        buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                         if name == "rendezvous_pairing_latency_seconds_bucket")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert value(samples, "rendezvous_registry_errors_total") == 0
        assert value(samples, "process_open_fds") > 0


def test_parked_per_id_only_when_asked(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path, metrics_per_id=True)) as s, \
            ExitStack() as sockets:
        first, second = s.add_entry(), s.add_entry()
        for entry in (first, first, second):
            sockets.enter_context(s.park(entry))
        s.wait_parked(first.uuid, 2)
        s.wait_parked(second.uuid, 1)
        samples = scrape(s)
        assert value(samples, "rendezvous_id_parked_connections", id=first.uuid) == 2
        assert value(samples, "rendezvous_id_parked_connections", id=second.uuid) == 1
        assert value(samples, "rendezvous_parked_connections") == 3


def test_health_and_readiness(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path)) as s:
        base = s.admin_url()
        assert requests.get(base + "/healthz", timeout=HTTP_TIMEOUT).text == "ok\n"
        ready = requests.get(base + "/readyz", timeout=HTTP_TIMEOUT)
        assert (ready.status_code, ready.text) == (200, "ready\n")

        # The relay stops listening (as at shutdown): alive, but no longer ready.
        s.sync(lambda: s.server._server.close())  # type: ignore[union-attr]
        ready = requests.get(base + "/readyz", timeout=HTTP_TIMEOUT)
        assert ready.status_code == 503 and "relay listener down" in ready.text
        assert requests.get(base + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200


def test_readiness_follows_the_registry(tmp_path: Path, redis_registry_url: str) -> None:
    with running_server(tmp_path, registry=open_registry(redis_registry_url),
                        admin=admin_config(tmp_path)) as s:
        ready = requests.get(s.admin_url() + "/readyz", timeout=HTTP_TIMEOUT)
        assert ready.status_code == 200

    # Nothing listens on port 1: the registry is unreachable.
    unreachable = open_registry("redis://127.0.0.1:1/0")
    with running_server(tmp_path, registry=unreachable, admin=admin_config(tmp_path)) as s:
        base = s.admin_url()
        assert requests.get(base + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200
        ready = requests.get(base + "/readyz", timeout=HTTP_TIMEOUT)
        assert ready.status_code == 503 and "registry unreachable" in ready.text
        # The page says so too, and the failures are counted.
        page = requests.get(base + "/", timeout=HTTP_TIMEOUT)
        assert page.status_code == 503 and "registry unavailable" in page.text
        assert value(scrape(s), "rendezvous_registry_errors_total") == 2
