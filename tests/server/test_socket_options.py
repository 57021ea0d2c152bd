"""Accepted sockets get TCP_NODELAY and parked ones keepalive probes from the public listener
(Linux copies a listener's options at accept), with no setsockopt per accept or park."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ServerThread, running_server

from rendezvous.server.leg import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL


@pytest.fixture(params=[True, False], ids=["tls", "plain"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(tmp_path, tls=request.param, settle=0.0) as thread:
        yield thread


def options(sock: Any) -> tuple[int, ...]:
    return (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


def test_parked_connections_have_nodelay_and_keepalive(server: ServerThread) -> None:
    entry = server.add_entry()
    with server.park(entry):
        hub = server.server.hub
        assert hub is not None
        found = server.sync(lambda: options(
            hub.parked(entry.uuid)[0].transport.get_extra_info("socket")))
    assert found == (1, 1, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
