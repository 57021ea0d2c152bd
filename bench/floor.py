"""The floor of a TLS pairing: the CPU of the two server-side TLS handshakes it needs (the
mobile client's and the re-parking hidden server's), measured in this process alone.

    python -m bench.floor CERT KEY        # one reading, printed as JSON

Client and server talk through memory BIOs (no sockets, no event loop, no kernel), and only the
server's calls are timed with the thread's CPU clock: creating its ``SSLObject`` and each
``do_handshake()`` step, with the relay's own server context (``rendezvous.tls``, so the same
certificate, cipher, key exchange and session tickets), against the bench clients' context.
Whatever a relay spends per pairing above twice this is its own: the event loop, the kernel's
socket work, its Python.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from bench import wire
from rendezvous.config import TLSConfig
from rendezvous.tls import server_ssl_context

# Handshakes per batch, and batches: the cheapest batch counts (background load only slows).
BATCH = 50
BATCHES = 6


def _step(tls: ssl.SSLObject) -> bool:
    """One handshake step; True once the handshake is complete."""
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def one_handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext
                  ) -> tuple[float, str | None]:
    """Run one full handshake in memory: the server side's CPU seconds, and the cipher."""
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_side=False)
    clock = time.thread_time
    spent = 0.0
    start = clock()
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    spent += clock() - start
    client_done = server_done = False
    for _ in range(10):  # TLS 1.3 takes two rounds, TLS 1.2 three
        if not client_done:
            client_done = _step(client)
        server_in.write(client_out.read())
        if not server_done:
            start = clock()
            server_done = _step(server)
            spent += clock() - start
        client_in.write(server_out.read())
        if client_done and server_done:
            break
    else:
        raise RuntimeError("the in-memory TLS handshake did not finish")
    cipher = server.cipher()
    return spent, cipher[0] if cipher else None


def measure(cert: Path, key: Path, batch: int = BATCH, batches: int = BATCHES
            ) -> dict[str, Any]:
    """Server-side CPU of one TLS handshake and of a pairing's two (the cheapest batch's mean),
    in milliseconds, with every batch's figure and the cipher negotiated."""
    server_context = server_ssl_context(TLSConfig(cert_file=cert, key_file=key))
    client_context = wire.client_context()
    one_handshake(server_context, client_context)  # warm: first use loads the key and tables
    per_batch = []
    cipher = None
    for _ in range(batches):
        total = 0.0
        for _ in range(batch):
            spent, cipher = one_handshake(server_context, client_context)
            total += spent
        per_batch.append(1000 * total / batch)
    handshake = min(per_batch)
    return {
        "handshake_ms": handshake,
        "pairing_ms": 2 * handshake,  # the mobile client's and the hidden server's re-park
        "batches_ms": per_batch,
        "handshakes": batch * batches,
        "cipher": cipher,
        "tickets": server_context.num_tickets,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.floor CERT KEY", file=sys.stderr)
        return 2
    print(json.dumps(measure(Path(args[0]), Path(args[1])), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
