"""What the relay's plain-HTTP listener (``serve --acme-http PORT``) answers, I/O-free.

Two things only: the ACME CA's HTTP-01 validation (RFC 8555 §8.3) fetches
``/.well-known/acme-challenge/TOKEN`` and gets the key authorization; every other request is
sent to HTTPS with ``308 Permanent Redirect`` (the method and body are kept, RFC 9110 §15.4.9)
to the same path on the relay's TLS port. The redirect's host is the request's ``Host`` only
when it is a name the relay serves (a ``--public-host`` name, or ``NAME.DOMAIN``); any other
``Host`` is sent to the first public host, never to itself: the listener is no open redirect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rendezvous.protocol import responses
from rendezvous.protocol.head import RequestHead
from rendezvous.protocol.hostnames import HTTPS_PORT, name_in, normal_domain, strip_port

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
# A request target longer than this is not redirected (a Location header that size helps no
# one); the head itself is bounded by the listener's max head size already.
MAX_TARGET = 4096


@dataclass(frozen=True, slots=True)
class Site:
    """The names the relay serves over HTTPS and where: the redirect's possible targets."""

    hosts: tuple[str, ...]  # --public-host names (not addresses); the first is the fallback
    domain: str = ""  # --domain: NAME.DOMAIN is served too
    https_port: int = HTTPS_PORT

    def serves(self, host: str) -> bool:
        """Whether ``host`` (a ``Host`` header's value) names a host the relay serves."""
        name = normal_domain(strip_port(host))
        return name in self.hosts or (bool(self.domain) and name_in(name, self.domain) is not None)


@dataclass(frozen=True, slots=True)
class Answer:
    """The response bytes and, for the log, what they were."""

    status: int
    data: bytes
    what: str  # "challenge", "redirect", "unknown token", "bad request"


def answer(head: RequestHead, site: Site, http01: Callable[[str], str | None]) -> Answer:
    """The response to one request head; ``http01(token)`` is a pending HTTP-01 challenge's key
    authorization, or None. Every response closes the connection."""
    target = head.target
    if not target.startswith("/") or len(target) > MAX_TARGET or not _visible_ascii(target):
        return Answer(400, responses.full_error(400, "invalid request target", True, True),
                      "bad request")
    if target.startswith(CHALLENGE_PREFIX) and head.method in ("GET", "HEAD"):
        token = target[len(CHALLENGE_PREFIX):]
        found = http01(token) if token and "/" not in token and "?" not in token else None
        if found is None:
            return Answer(404, responses.full_error(404, "no such ACME challenge", close=True),
                          "unknown token")
        body = found.encode("ascii")
        head_only = head.method == "HEAD"
        return Answer(200, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                      % (len(body), b"" if head_only else body), "challenge")
    given = head.header(b"host")
    host = given.decode("latin-1") if given is not None else ""
    if site.serves(host):
        name = normal_domain(strip_port(host))
    elif site.hosts:
        name = site.hosts[0]
    else:
        return Answer(400, responses.full_error(400, "unknown host", True, True), "bad request")
    port = "" if site.https_port == HTTPS_PORT else f":{site.https_port}"
    location = f"https://{name}{port}{target}".encode("ascii")
    return Answer(308, b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\n"
                  b"Content-Length: 0\r\nConnection: close\r\n\r\n" % location, "redirect")


def _visible_ascii(text: str) -> bool:
    return text.isascii() and all(" " < c < "\x7f" for c in text)
