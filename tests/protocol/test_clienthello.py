"""protocol/clienthello.py on real ClientHellos (Python's ssl, curl, openssl s_client, and one
Chromium 156 sent, with its post-quantum key share) and on truncated, split and garbage input."""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from rendezvous.errors import ClientHelloError
from rendezvous.protocol import clienthello
from rendezvous.protocol.clienthello import MAX_CLIENT_HELLO, NEED_MORE, ClientHello, parse

DATA = Path(__file__).parent / "data"
# Captured from headless Chromium 156 opening https://hub.relay.test:PORT/ (X25519MLKEM768 key
# share: the message is ~1.9 KiB, more than a small MSS).
CHROMIUM = DATA / "chromium-clienthello.bin"


def python_hello(server_name: str | None, alpn: list[str] | None = None,
                 maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> bytes:
    """The ClientHello Python's ssl sends (through memory BIOs, no socket)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def captured(command: list[str]) -> bytes:
    """The first bytes ``command`` sends to a listener on {port} (until a whole ClientHello)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        got: list[bytes] = []

        def accept() -> None:
            server.settimeout(10)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while parse(data) is NEED_MORE:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                got.append(data)

        thread = threading.Thread(target=accept)
        thread.start()
        proc = subprocess.Popen([part.format(port=port) for part in command],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        thread.join(15)
        proc.kill()
        proc.wait()
    assert got, f"{command[0]} sent nothing"
    return got[0]


def split_records(hello: bytes, size: int) -> bytes:
    """The same handshake message re-framed in records of at most ``size`` bytes each (TLS
    allows a ClientHello over several records; some anti-DPI tools do it)."""
    assert hello[0] == 22
    message = hello[5:]
    out = b""
    for i in range(0, len(message), size):
        part = message[i:i + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(part)) + part
    return out


def test_python_ssl_hellos() -> None:
    assert parse(python_hello("hub.relay.test", ["acme-tls/1"])) == ClientHello(
        "hub.relay.test", ("acme-tls/1",))
    assert parse(python_hello("Relay.Test.", ["h2", "http/1.1", "acme-tls/1"])) == ClientHello(
        "relay.test", ("h2", "http/1.1", "acme-tls/1"))
    assert parse(python_hello(None)) == ClientHello(None, ())
    assert parse(python_hello("old.test", ["http/1.1"], ssl.TLSVersion.TLSv1_2)) == ClientHello(
        "old.test", ("http/1.1",))


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_hello() -> None:
    data = captured(["curl", "-sk", "--max-time", "5", "--resolve",
                     "hub.relay.test:{port}:127.0.0.1", "https://hub.relay.test:{port}/"])
    hello = parse(data)
    assert hello == ClientHello("hub.relay.test", ("h2", "http/1.1"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_hello_offering_acme_tls() -> None:
    data = captured(["openssl", "s_client", "-connect", "127.0.0.1:{port}",
                     "-servername", "relay.test", "-alpn", "acme-tls/1"])
    assert parse(data) == ClientHello("relay.test", ("acme-tls/1",))


def test_chromium_hello() -> None:
    data = CHROMIUM.read_bytes()
    assert len(data) > 1500  # more than one Ethernet-sized segment
    assert parse(data) == ClientHello("hub.relay.test", ("h2", "http/1.1"))


@pytest.mark.parametrize("source", ["python", "chromium"])
def test_every_prefix_needs_more_and_any_split_gives_the_same(source: str) -> None:
    data = (CHROMIUM.read_bytes() if source == "chromium"
            else python_hello("hub.relay.test", ["h2", "acme-tls/1"]))
    whole = parse(data)
    assert isinstance(whole, ClientHello)
    for end in range(len(data)):
        assert parse(data[:end]) is NEED_MORE, end
    # Bytes after it (the client's next flight never comes first, but a PROXY leftover or a
    # pipelining client could): the ClientHello is still the same.
    assert parse(data + b"\x17\x03\x03\x00\x05hello") == whole
    for size in (len(data) // 30, 100, 512, 1400):
        assert parse(split_records(data, size)) == whole, size
    with pytest.raises(ClientHelloError):  # in too many records
        parse(split_records(data, 7))


def test_garbage_and_lies_raise() -> None:
    good = python_hello("hub.relay.test", ["acme-tls/1"])
    bad = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the TLS port
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"\x80\x2e\x01\x03\x01",  # SSL 2.0-style hello
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\xff\xff" + b"\x01" * 10,  # a record over 2^14 + 2048
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello first
        b"\x15\x03\x01\x00\x02\x02\x28",  # an alert
        good[:5] + b"\x01\x00\x00\x02ab",  # a body too short for version and random
    ]
    for data in bad:
        with pytest.raises(ClientHelloError):
            parse(data)
    # Over the size limit: refused as soon as the header says so.
    with pytest.raises(ClientHelloError):
        parse(good[:9], max_size=len(good) - 10)
    huge = b"\x16\x03\x01\x40\x00\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")
    with pytest.raises(ClientHelloError):
        parse(huge)
    # A lying inner length (extensions longer than the message) is caught, not read past.
    body = bytearray(good)
    index = body.find(b"\x00\x10")  # the ALPN extension's type
    assert index > 0
    body[index + 2:index + 4] = b"\xff\xff"
    with pytest.raises(ClientHelloError):
        parse(bytes(body))


def test_random_mutations_never_escape_the_error_tree() -> None:
    """Fuzz-ish: flipped bytes and truncations give a ClientHello, NEED_MORE or
    ClientHelloError, never another exception (bounded: 4,000 cases, under a second)."""
    rng = random.Random(13)
    seeds = [python_hello("hub.relay.test", ["h2", "acme-tls/1"]), CHROMIUM.read_bytes()]
    outcomes = set()
    for _ in range(2000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        for sample in (bytes(data), bytes(data[:rng.randrange(len(data))])):
            try:
                result = parse(sample)
            except ClientHelloError:
                outcomes.add("error")
                continue
            outcomes.add("more" if result is NEED_MORE else "hello")
            if isinstance(result, ClientHello) and result.server_name is not None:
                assert result.server_name.isascii()
    assert outcomes == {"error", "more", "hello"}


def test_module_is_io_free() -> None:
    source = Path(clienthello.__file__).read_text()
    for module in ("asyncio", "socket", "ssl"):
        assert f"import {module}" not in source
