"""The relay starts each pairing with a PROXY header for an agent that asks (``&proxy=N``: the
provisioning file's ``proxyProtocol``, or the agent's ``proxy_protocol`` over it), and
``forward_to`` passes it on to a local service that speaks it."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import ServerThread, running_server
from hidden_support import (
    ProxyHeaderService,
    proxy_source,
    total_parks,
    wait_until,
    write_provisioning_for,
)

from rendezvous.agent import HiddenAgent, hidden
from rendezvous.protocol.proxy import V2_SIGNATURE
from rendezvous.provisioning import Provisioning, load_provisioning

VISITOR = "127.0.0.21"
CLIENT_TIMEOUT = 10.0


async def visit(s: ServerThread, uuid: str, path: str = "/who") -> dict[str, Any]:
    """One request from VISITOR through the relay to the hidden server ``uuid``; what the
    PROXY-speaking local service answered."""
    assert s.tls is not None
    transport = httpx.AsyncHTTPTransport(verify=str(s.tls.cert_file), local_address=VISITOR)
    async with httpx.AsyncClient(transport=transport, timeout=CLIENT_TIMEOUT) as client:
        response = await client.get(s.url() + path, auth=httpx.BasicAuth(uuid, "x"))
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    assert found["request"] == f"GET {path} HTTP/1.1"
    return found


async def headers_seen(s: ServerThread, provisioning: Provisioning,
                       reloaded: Provisioning | None = None, **options: Any) -> list[bytes]:
    """The PROXY header a local service behind an agent of ``provisioning`` (with ``options``)
    gets for a visit; with ``reloaded``, then the one after the agent reloads that file."""
    service = ProxyHeaderService()
    agent = HiddenAgent(provisioning, handler=hidden.forward_to("127.0.0.1", service.port),
                        pool=1, **options)
    running = asyncio.create_task(agent.run())
    try:
        seen = [bytes.fromhex((await visit(s, provisioning.uuid))["header"])]
        if reloaded is not None:
            parks = total_parks(s)
            agent.reload(reloaded)
            # Its link is recycled: the replacement parks first, then the old one goes.
            await wait_until(lambda: total_parks(s) > parks and s.parked(provisioning.uuid) == 1)
            seen.append(bytes.fromhex((await visit(s, provisioning.uuid))["header"]))
        return seen
    finally:
        await agent.stop(1)
        await asyncio.wait_for(running, 5)
        service.close()


@pytest.mark.parametrize("version", [1, 2])
def test_a_local_service_gets_the_visitors_address_in_a_proxy_header(tmp_path: Path,
                                                                     version: int) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))
        [header] = asyncio.run(headers_seen(s, provisioning, proxy_protocol=version))
        assert header.startswith(b"PROXY TCP4 " if version == 1 else V2_SIGNATURE)
        source, destination, _, port = proxy_source(header)
        assert (source, destination, port) == (VISITOR, "127.0.0.1", s.port)


def test_the_files_option_is_used_and_the_agents_overrides_it(tmp_path: Path) -> None:
    with running_server(tmp_path) as s:
        entry = replace(s.add_entry(), proxy_protocol=2)
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))
        assert provisioning.proxy_protocol == 2
        [header] = asyncio.run(headers_seen(s, provisioning))
        assert header.startswith(V2_SIGNATURE)  # v2, from the file
        assert proxy_source(header)[0] == VISITOR
        [header] = asyncio.run(headers_seen(s, provisioning, proxy_protocol=1))
        assert header.startswith(b"PROXY TCP4 127.0.0.21 ")  # the agent's option wins


def test_a_reload_follows_the_files_option_unless_the_agent_has_its_own(tmp_path: Path) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        plain = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))
        assert plain.proxy_protocol == 0
        v1 = replace(plain, proxy_protocol=1)
        first, second = asyncio.run(headers_seen(s, replace(plain, proxy_protocol=2), v1))
        assert first.startswith(V2_SIGNATURE) and first != second
        assert second.startswith(b"PROXY TCP4 127.0.0.21 ")
        first, second = asyncio.run(headers_seen(s, plain, v1, proxy_protocol=2))
        assert first[:12] == second[:12] == V2_SIGNATURE


@pytest.mark.parametrize(("in_file", "options"), [(0, {}), (2, {"proxy_protocol": 0})],
                         ids=["none in the file", "the agent's 0 over the file's 2"])
def test_without_the_option_nothing_is_added(tmp_path: Path, in_file: int,
                                             options: dict[str, Any]) -> None:
    with running_server(tmp_path) as s:
        entry = replace(s.add_entry(), proxy_protocol=in_file)
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))
        assert s.tls is not None

        async def first_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            body = head.split(b"\r\n")[0]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            writer.close()

        async def scenario() -> None:
            service = await asyncio.start_server(first_bytes, "127.0.0.1", 0)
            port = service.sockets[0].getsockname()[1]
            agent = HiddenAgent(provisioning, handler=hidden.forward_to("127.0.0.1", port), pool=1,
                                **options)
            running = asyncio.create_task(agent.run())
            async with httpx.AsyncClient(verify=str(s.tls.cert_file),  # type: ignore[union-attr]
                                         timeout=CLIENT_TIMEOUT) as client:
                response = await client.get(s.url() + "/x", auth=httpx.BasicAuth(entry.uuid, "x"))
            assert response.text == "GET /x HTTP/1.1"
            await agent.stop(1)
            await asyncio.wait_for(running, 5)
            service.close()

        asyncio.run(scenario())


def test_a_bad_proxy_protocol_value_is_refused(tmp_path: Path) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))
        with pytest.raises(ValueError, match="proxy_protocol must be 0, 1 or 2"):
            HiddenAgent(provisioning, handler=hidden.forward_to("127.0.0.1", 9), proxy_protocol=3)
