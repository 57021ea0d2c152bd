"""What reading the ClientHello before the handshake costs (``serve --acme``, issue 13).

While a TLS-ALPN-01 challenge is pending the relay reads each ClientHello itself
(protocol/clienthello.py) to pick the challenge context only for the CA's handshake; otherwise
it must cost nothing. This runs one relay in-process (uvloop) and, in the same loop, clients
that each do a full TLS handshake and one request (answered by the relay's 401 challenge), in
three setups, alternating and keeping each one's best run:

- ``off``: no ACME at all (``hub.challenges`` is None);
- ``idle``: ``--acme`` with no challenge pending (every day but the minutes of an order);
- ``pending``: a challenge pending for another name, so every ClientHello is read first.

It prints microseconds per connection and the ratios to ``off``, and the parser's own cost on
a captured Chromium ClientHello (~1.9 KiB, post-quantum key share). Figures go to
``bench/results/peek.json`` (``--quick``: ``bench/results/quick/peek.json``).

    .venv/bin/python -m bench.peek            # about a minute
    .venv/bin/python -m bench.peek --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
import time
import timeit
from pathlib import Path

import uvloop

from rendezvous.config import ServerConfig
from rendezvous.protocol import clienthello
from rendezvous.server.app import RendezvousServer
from rendezvous.server.certificates import Challenges
from rendezvous.tls import ensure_self_signed

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_HELLO = REPO / "tests" / "protocol" / "data" / "chromium-clienthello.bin"
NAME = "relay.test"
REQUEST = b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n"
SETUPS = ("off", "idle", "pending")
CONCURRENCY = 8
RUN_TIMEOUT = 120.0  # seconds one run may take at most (a broken relay must not hang us)


async def connections(port: int, count: int) -> float:
    """Seconds for ``count`` handshake+request+close cycles, CONCURRENCY at a time."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                           server_hostname=NAME)
            writer.write(REQUEST)
            await reader.readuntil(b"\r\n\r\n")
            writer.close()

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))),
                           RUN_TIMEOUT)
    return time.perf_counter() - start


async def measure(count: int, rounds: int) -> dict[str, float]:
    """Best microseconds per connection of each setup over ``rounds`` alternating runs."""
    with tempfile.TemporaryDirectory(prefix="bench-peek-") as folder:
        tls = ensure_self_signed(Path(folder), [NAME])
        config = ServerConfig(host="127.0.0.1", port=0, tls=tls, registry_url="memory://")
        server = RendezvousServer(config)
        await server.start()
        try:
            hub = server.hub
            assert hub is not None
            idle = Challenges()
            pending = Challenges()
            pending.add("other.test", b"\0" * 32)  # pending, for a name no client asks for
            setups = {"off": None, "idle": idle, "pending": pending}
            await connections(server.port, max(count // 10, CONCURRENCY))  # warm up
            best = {name: float("inf") for name in SETUPS}
            for _ in range(rounds):
                for name in SETUPS:
                    hub.challenges = setups[name]
                    seconds = await connections(server.port, count)
                    best[name] = min(best[name], seconds / count * 1e6)
        finally:
            await server.close(grace=0)
    return best


def parse_cost() -> float:
    """Microseconds per parse of the captured Chromium ClientHello."""
    data = CHROMIUM_HELLO.read_bytes()
    number = 2000
    best = min(timeit.repeat(lambda: clienthello.parse(data), number=number, repeat=5))
    return best / number * 1e6


def check_cost() -> float:
    """Nanoseconds of what ``idle`` adds to each accept: whether any challenge is pending."""
    challenges: Challenges | None = Challenges()
    number = 200_000

    def check() -> bool:
        return challenges is not None and challenges.alpn_pending

    return min(timeit.repeat(check, number=number, repeat=5)) / number * 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peek", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, a few seconds")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/...)")
    args = parser.parse_args(argv)
    count, rounds = (200, 2) if args.quick else (1000, 3)
    best = uvloop.run(measure(count, rounds))
    ratios = {name: round(best[name] / best["off"], 3) for name in SETUPS}
    results = {
        "connections_per_run": count, "rounds": rounds, "concurrency": CONCURRENCY,
        "us_per_connection": {name: round(value, 1) for name, value in best.items()},
        "ratio_to_off": ratios,
        "parse_us_chromium_hello": round(parse_cost(), 2),
        "accept_check_ns_idle": round(check_cost(), 1),
    }
    for name in SETUPS:
        print(f"{name:8} {best[name]:8.1f} us/connection  x{ratios[name]:.3f}")
    print(f"parse of a {CHROMIUM_HELLO.stat().st_size}-byte Chromium ClientHello: "
          f"{results['parse_us_chromium_hello']} us")
    out = args.out or REPO / "bench" / "results" / ("quick" if args.quick else "") / "peek.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"added to each accept with --acme and nothing pending: "
          f"{results['accept_check_ns_idle']} ns")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
