"""The PROXY protocol parser and writers (protocol/proxy.py), without I/O."""

from __future__ import annotations

import struct

import pytest

from rendezvous.errors import ProxyHeaderError
from rendezvous.protocol import proxy
from rendezvous.protocol.proxy import V2_MAX_PAYLOAD, V2_SIGNATURE, ProxyHeader


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes((0x20 | command, family)) + struct.pack("!H", len(block)) + block


def test_v1_tcp4_and_what_follows_it() -> None:
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n\x16\x03\x01"
    header = proxy.parse(data)
    assert header == ProxyHeader(1, ("192.0.2.7", 56324), ("198.51.100.1", 443), size=45)
    assert data[header.size:] == b"\x16\x03\x01"


def test_v1_tcp6_is_normalised() -> None:
    header = proxy.parse(b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 65535\r\n")
    assert header is not None
    assert header.source == ("2001:db8::1", 1) and header.destination == ("::1", 65535)


def test_v1_unknown_names_no_address() -> None:
    header = proxy.parse(b"PROXY UNKNOWN ffff::1 whatever\r\nGET / HTTP/1.1\r\n")
    assert header == ProxyHeader(1, None, None, size=len(b"PROXY UNKNOWN ffff::1 whatever\r\n"))
    assert proxy.parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, None, None, size=15)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # a field short
    b"PROXY TCP5 192.0.2.7 198.51.100.1 1 2\r\n",  # no such family
    b"PROXY TCP4 ::1 198.51.100.1 1 2\r\n",  # IPv6 under TCP4
    b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
    b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n",  # not an address
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",  # not a port
    b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",  # a leading zero
    b"PROXY TCP4 192.0.2.7  198.51.100.1 1 2\r\n",  # two spaces
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",  # LF alone
    b"PROXY TCP4 \xff.0.2.7 198.51.100.1 1 2\r\n",  # not ASCII
])
def test_v1_malformed_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        proxy.parse(line)


def test_v1_line_past_107_bytes_is_refused_without_a_crlf() -> None:
    assert proxy.parse(b"PROXY TCP6 " + b"1" * 95) is None  # 106 bytes: may still end
    with pytest.raises(ProxyHeaderError, match="too long"):
        proxy.parse(b"PROXY TCP6 " + b"1" * 96)
    with pytest.raises(ProxyHeaderError, match="too long"):
        proxy.parse(b"PROXY TCP6 " + b"1" * 200 + b"\r\n")


def test_v2_tcp4_with_tlvs() -> None:
    block = bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 56324, 443)
    tlvs = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com" + b"\x04\x00\x00"
    data = v2(1, 0x11, block + tlvs) + b"rest"
    header = proxy.parse(data)
    assert header is not None
    assert header.version == 2
    assert header.source == ("192.0.2.7", 56324) and header.destination == ("198.51.100.1", 443)
    assert header.tlvs == ((1, b"h2"), (2, b"example.com"), (4, b""))
    assert data[header.size:] == b"rest"


def test_v2_tcp6() -> None:
    src = bytes(15) + b"\x01"
    dst = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x02"
    header = proxy.parse(v2(1, 0x21, src + dst + struct.pack("!HH", 1, 2)))
    assert header is not None
    assert header.source == ("::1", 1) and header.destination == ("2001:db8::2", 2)


def test_v2_local_and_unspecified_carry_no_address() -> None:
    # haproxy's health checks are LOCAL; an address block there is to be ignored.
    local = proxy.parse(v2(0, 0x11, bytes(12)))
    assert local == ProxyHeader(2, None, None, size=28)
    assert proxy.parse(v2(0, 0x00, b"")) == ProxyHeader(2, None, None, size=16)
    unix = proxy.parse(v2(1, 0x31, bytes(216)))
    assert unix is not None and unix.source is None


def test_truncated_headers_need_more_at_every_length() -> None:
    block = bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 1, 2) + b"\x01\x00\x02h2"
    for whole in (v2(1, 0x11, block), b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\r\n"):
        for size in range(len(whole)):
            assert proxy.parse(whole[:size]) is None, size
        header = proxy.parse(whole)
        assert header is not None and header.source == ("192.0.2.7", 1)


@pytest.mark.parametrize("data", [
    V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", V2_MAX_PAYLOAD + 1),  # oversized
    V2_SIGNATURE + bytes((0x11, 0x11)) + struct.pack("!H", 12) + bytes(12),  # version 1 bits
    V2_SIGNATURE + bytes((0x22, 0x11)) + struct.pack("!H", 12) + bytes(12),  # command 2
    V2_SIGNATURE + bytes((0x21, 0x41)) + struct.pack("!H", 12) + bytes(12),  # family 4
    V2_SIGNATURE + bytes((0x21, 0x21)) + struct.pack("!H", 12) + bytes(12),  # IPv6 block short
    V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", 14) + bytes(14),  # TLV truncated
    V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", 15) + bytes(12) + b"\x01\x00\x09",
    b"GET / HTTP/1.1\r\n\r\n",  # garbage: not a header at all
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"\r\n\r\nX",
    b"PROXX TCP4",
])
def test_bad_v2_headers_and_garbage_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        proxy.parse(data)


def test_writers_round_trip() -> None:
    line = proxy.encode_v1(("192.0.2.7", 5), ("198.51.100.1", 443))
    assert line == b"PROXY TCP4 192.0.2.7 198.51.100.1 5 443\r\n"
    for encode in (proxy.encode_v1, proxy.encode_v2):
        for src, dst in ((("192.0.2.7", 5), ("198.51.100.1", 443)), (("::1", 7), ("::2", 8))):
            header = proxy.parse(encode(src, dst))
            assert header is not None and (header.source, header.destination) == (src, dst)
        mixed = proxy.parse(encode(("192.0.2.7", 5), ("::1", 8)))  # unsayable: no address
        assert mixed is not None and mixed.source is None
    local = proxy.parse(proxy.encode_v2(None, None))
    assert local == ProxyHeader(2, None, None, size=16)


def test_starts_with_proxy_needs_the_whole_fixed_start() -> None:
    assert proxy.starts_with_proxy(b"PROXY TCP4 ...")
    assert proxy.starts_with_proxy(V2_SIGNATURE + b"\x21")
    assert not proxy.starts_with_proxy(b"PROPFIND / HTTP/1.1\r\n")
    assert not proxy.starts_with_proxy(b"POST / HTTP/1.1\r\n")
    assert not proxy.starts_with_proxy(b"\r\n\r\n")


def test_forwarded_header_quotes_ipv6() -> None:
    assert proxy.forwarded_header("192.0.2.7", True) == b"Forwarded: for=192.0.2.7;proto=https\r\n"
    assert proxy.forwarded_header("2001:db8::1", False) == (
        b'Forwarded: for="[2001:db8::1]";proto=http\r\n')
    assert proxy.forwarded_header("-", True) == b"Forwarded: for=unknown;proto=https\r\n"
