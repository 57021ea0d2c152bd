"""The relay starts each pairing with a PROXY header for an agent that asks (``&proxy=N``, the
agent's ``proxy_protocol``), and ``forward_to`` passes it on to a local service that speaks it."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import httpx
import pytest
from harness import running_server
from hidden_support import write_provisioning_for

from rendezvous.agent import HiddenAgent, hidden
from rendezvous.protocol.proxy import V2_SIGNATURE
from rendezvous.provisioning import load_provisioning

VISITOR = "127.0.0.21"
CLIENT_TIMEOUT = 10.0


async def proxy_speaking_service(reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
    """A local service behind the agent that expects a PROXY header before HTTP: answers what
    header it got, raw (hex), and the request line."""
    first = await reader.readexactly(12)
    if first == V2_SIGNATURE:
        rest = await reader.readexactly(4)
        header = first + rest + await reader.readexactly(int.from_bytes(rest[2:4], "big"))
    else:
        header = first + await reader.readuntil(b"\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    answer = json.dumps({"header": header.hex(),
                         "request": head.split(b"\r\n")[0].decode()}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (len(answer), answer))
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("version", [1, 2])
def test_a_local_service_gets_the_visitors_address_in_a_proxy_header(tmp_path: Path,
                                                                     version: int) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
        provisioning = load_provisioning(write_provisioning_for(s, entry, tmp_path / "hub.json"))
        assert s.tls is not None

        async def scenario() -> None:
            service = await asyncio.start_server(proxy_speaking_service, "127.0.0.1", 0)
            port = service.sockets[0].getsockname()[1]
            agent = HiddenAgent(provisioning, handler=hidden.forward_to("127.0.0.1", port),
                                pool=1, proxy_protocol=version)
            running = asyncio.create_task(agent.run())
            transport = httpx.AsyncHTTPTransport(verify=str(s.tls.cert_file),  # type: ignore[union-attr]
                                                 local_address=VISITOR)
            async with httpx.AsyncClient(transport=transport, timeout=CLIENT_TIMEOUT) as client:
                response = await client.get(s.url() + "/who",
                                            auth=httpx.BasicAuth(entry.uuid, "x"))
            assert response.status_code == 200, response.text
            found = response.json()
            assert found["request"] == "GET /who HTTP/1.1"
            header = bytes.fromhex(found["header"])
            if version == 1:
                match = re.fullmatch(rb"PROXY TCP4 127\.0\.0\.21 127\.0\.0\.1 (\d+) (\d+)\r\n",
                                     header)
                assert match, header
                assert int(match.group(2)) == s.port
            else:
                assert header[:12] == V2_SIGNATURE and header[12:14] == b"\x21\x11"
                assert header[16:24] == socket.inet_aton(VISITOR) + socket.inet_aton("127.0.0.1")
                assert int.from_bytes(header[26:28], "big") == s.port
            await agent.stop(1)
            await asyncio.wait_for(running, 5)
            service.close()

        asyncio.run(scenario())


def test_without_the_option_nothing_is_added(tmp_path: Path) -> None:
    with running_server(tmp_path) as s:
        entry = s.add_entry()
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
            agent = HiddenAgent(provisioning, handler=hidden.forward_to("127.0.0.1", port), pool=1)
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
