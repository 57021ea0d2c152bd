"""protocol/plainhttp.py: what the --acme-http listener answers, on bytes (no I/O)."""

from __future__ import annotations

import pytest

from rendezvous.protocol.head import HeadReader, RequestHead
from rendezvous.protocol.plainhttp import Site, answer

SITE = Site(hosts=("relay.example.org", "other.example.org"), domain="relay.example.org",
            https_port=443)
TOKENS = {"tok-EN_1": "tok-EN_1.thumbprint"}


def head(raw: bytes) -> RequestHead:
    found = HeadReader().feed(raw)
    assert isinstance(found, RequestHead)
    return found


def location(data: bytes) -> str:
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"location: "):
            return line[10:].decode()
    raise AssertionError(data)


@pytest.mark.parametrize(("host", "port", "target", "expected"), [
    ("relay.example.org", 443, "/", "https://relay.example.org/"),
    ("Relay.Example.ORG.:80", 443, "/a?b=c#", "https://relay.example.org/a?b=c#"),
    ("other.example.org", 8443, "/x", "https://other.example.org:8443/x"),
    ("hub.relay.example.org", 443, "/x", "https://hub.relay.example.org/x"),
    ("evil.example", 443, "/x", "https://relay.example.org/x"),
    ("relay.example.org.evil.example", 443, "/", "https://relay.example.org/"),
    ("a.b.relay.example.org", 443, "/", "https://relay.example.org/"),
    ("-bad-.relay.example.org", 443, "/", "https://relay.example.org/"),
    ("[::1]:80", 443, "/", "https://relay.example.org/"),
])
def test_redirects_only_to_names_the_relay_serves(host: str, port: int, target: str,
                                                 expected: str) -> None:
    site = Site(SITE.hosts, SITE.domain, port)
    result = answer(head(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target.encode(),
                                                                   host.encode())),
                    site, TOKENS.get)
    assert result.status == 308 and result.what == "redirect"
    assert location(result.data) == expected
    assert b"Connection: close\r\n" in result.data and b"Content-Length: 0\r\n" in result.data


def test_no_host_and_no_public_host_is_400() -> None:
    result = answer(head(b"GET / HTTP/1.0\r\n\r\n"), Site(hosts=()), TOKENS.get)
    assert result.status == 400
    assert answer(head(b"GET / HTTP/1.0\r\n\r\n"), SITE, TOKENS.get).status == 308


@pytest.mark.parametrize("target", ["http://evil.example/", "*", "https://x/",
                                    "/" + "a" * 5000])
def test_targets_that_are_not_paths_are_400(target: str) -> None:
    raw = b"GET %s HTTP/1.1\r\nHost: relay.example.org\r\n\r\n" % target.encode()
    assert answer(head(raw), SITE, TOKENS.get).status == 400


def test_http01_answers_and_unknown_tokens() -> None:
    raw = b"GET /.well-known/acme-challenge/tok-EN_1 HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    result = answer(head(raw), SITE, TOKENS.get)
    assert result.status == 200 and result.what == "challenge"
    assert result.data.endswith(b"\r\n\r\ntok-EN_1.thumbprint")
    result = answer(head(raw.replace(b"GET", b"HEAD", 1)), SITE, TOKENS.get)
    assert result.status == 200 and result.data.endswith(b"\r\n\r\n")
    assert b"Content-Length: 19\r\n" in result.data  # (the length of the GET body)
    for path in (b"/.well-known/acme-challenge/nope", b"/.well-known/acme-challenge/",
                 b"/.well-known/acme-challenge/tok-EN_1/x",
                 b"/.well-known/acme-challenge/tok-EN_1?x"):
        result = answer(head(b"GET %s HTTP/1.1\r\nHost: relay.example.org\r\n\r\n" % path),
                        SITE, TOKENS.get)
        assert result.status == 404, path
    # Another method on the path is not a validation: redirected like any request.
    raw = b"POST /.well-known/acme-challenge/tok-EN_1 HTTP/1.1\r\nHost: x\r\n\r\n"
    assert answer(head(raw), SITE, TOKENS.get).status == 308
