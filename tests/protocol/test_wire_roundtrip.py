"""What the relay writes is what the agents read, I/O-free: every response the relay makes goes
through the reading side of ``responses``, and the Digest client answers the relay's challenges
in a way the relay's own check accepts (and only for the request it was made for)."""

from __future__ import annotations

import re

import pytest

from rendezvous import errors
from rendezvous.agent.mobile import MAX_ERROR_BODY as MOBILE_MAX_ERROR_BODY
from rendezvous.agent.mobile import relay_diagnostic as mobile_relay_diagnostic
from rendezvous.protocol import digest, responses
from rendezvous.protocol.digest import NonceBook, VisitorSecret
from rendezvous.protocol.head import HEAD_END
from rendezvous.protocol.ids import valid_id
from rendezvous.protocol.responses import (
    MAX_RETRY_AFTER,
    ResponseHead,
    error_text,
    may_be_relay_error,
    parse_response_head,
    relay_diagnostic,
)
from rendezvous.protocol.routing import DIAG_INVALID, DIAG_NOT_REGISTERED, DIAG_TOO_MANY


def split(answer: bytes) -> tuple[ResponseHead, bytes]:
    """The head and the body of a response as an agent reads it."""
    end = answer.index(HEAD_END) + len(HEAD_END)
    head = parse_response_head(answer[:end])
    assert head is not None, answer
    return head, answer[end:]


# Responses --------------------------------------------------------------------------------


def test_the_parked_answer_reads_as_200() -> None:
    head, body = split(responses.PARKED)
    assert (head.status, head.reason, head.headers, body) == (200, "", (), b"")


@pytest.mark.parametrize("permanent", [False, True])
def test_a_bare_error_reads_back_as_its_status_and_diagnostic(permanent: bool) -> None:
    head, body = split(responses.bare_error(401, DIAG_INVALID, permanent))
    assert head.status == 401 and head.reason == "" and head.content_length is None
    assert may_be_relay_error(head)
    assert relay_diagnostic(head.status, body) == DIAG_INVALID == error_text(body)


def test_a_429_carries_its_retry_after() -> None:
    head, body = split(responses.bare_error(429, DIAG_TOO_MANY, extra=b"Retry-After: 17\r\n"))
    assert head.status == 429 and head.retry_after == 17.0
    assert may_be_relay_error(head) and relay_diagnostic(429, body) == DIAG_TOO_MANY


@pytest.mark.parametrize(("value", "seconds"), [
    ("0", 0.0), ("2.5", 2.5), ("-4", 0.0), ("99999999", MAX_RETRY_AFTER), ("inf", MAX_RETRY_AFTER),
    ("nan", None), ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("", None),
])
def test_retry_after_is_bounded_and_garbage_ignored(value: str, seconds: float | None) -> None:
    head = parse_response_head(f"HTTP/1.1 429\r\nRetry-After: {value}\r\n\r\n".encode())
    assert head is not None and head.retry_after == seconds


@pytest.mark.parametrize("close", [False, True])
def test_a_full_error_reads_back_framed(close: bool) -> None:
    head, body = split(responses.full_error(404, DIAG_NOT_REGISTERED, close=close))
    assert (head.status, head.reason) == (404, "Not Found")
    assert head.content_length == len(body) and head.closes is close
    assert head.header("CONTENT-TYPE") == "application/json"
    assert may_be_relay_error(head) and relay_diagnostic(404, body) == DIAG_NOT_REGISTERED


def test_status_only_answers_have_no_body() -> None:
    head, body = split(responses.status_only(431))
    assert (head.status, head.content_length, head.closes, body) == (431, 0, True, b"")


def test_a_hidden_servers_json_error_is_not_taken_for_the_relays() -> None:
    lookalike = b'{"error": {"permanent": false, "diagnostic": "UUID not registered"}}'
    assert relay_diagnostic(404, lookalike) is None  # not the relay's exact bytes
    assert relay_diagnostic(200, responses.error_body("x")) is None  # not an error status
    assert relay_diagnostic(500, b" " * (MOBILE_MAX_ERROR_BODY + 1)) is None
    assert error_text(lookalike) == "UUID not registered"  # still readable for people
    assert error_text(b"<html>\n  Bad   gateway </html>") == "<html> Bad gateway </html>"
    chunked = parse_response_head(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked is not None and not may_be_relay_error(chunked)
    framed_html = parse_response_head(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n"
                                      b"Content-Length: 20\r\n\r\n")
    assert framed_html is not None and not may_be_relay_error(framed_html)


@pytest.mark.parametrize("data", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 20 OK\r\n\r\n",
                                  b"HTTP/2 200\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"])
def test_what_is_not_an_http1_response_head_is_none(data: bytes) -> None:
    assert parse_response_head(data) is None


def test_the_mobile_agent_reads_with_the_same_functions() -> None:
    assert mobile_relay_diagnostic is relay_diagnostic
    assert MOBILE_MAX_ERROR_BODY == responses.MAX_ERROR_BODY


# Digest: the client against the relay's check ---------------------------------------------


def challenge_lines(book: NonceBook) -> list[str]:
    """The relay's visitor challenge, one WWW-Authenticate value per algorithm."""
    raw = responses.challenge(False, False, authenticate=digest.challenge_headers(book))
    head, _ = split(raw)
    assert head.status == 401
    return [value for name, value in head.headers if name.lower() == "www-authenticate"]


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_the_digest_client_answers_the_relays_challenge(algorithm: str) -> None:
    book = NonceBook()
    secret = VisitorSecret.from_password("id-1", "pw")
    (line,) = [c for c in challenge_lines(book) if f"algorithm={algorithm}," in c]
    value = digest.digest_authorization(line, "id-1", "pw", "GET", "/a?b=c")
    assert value is not None and f"algorithm={algorithm}" in value
    assert f'opaque="{responses.OPAQUE}"' in value
    answer = value.encode()
    assert digest.verify(answer, "GET", "id-1", secret, book, target="/a?b=c") == "ok"
    assert digest.verify(answer, "GET", "id-1", secret, book, target="/a?b=c") == "invalid"


def test_a_digest_for_another_target_is_refused() -> None:
    book = NonceBook()
    secret = VisitorSecret.from_password("id-1", "pw")
    line = challenge_lines(book)[0]
    for_other = digest.digest_authorization(line, "id-1", "pw", "GET", "/other")
    assert for_other is not None
    assert digest.verify(for_other.encode(), "GET", "id-1", secret, book, target="/") == "invalid"
    # Unchanged otherwise: the same response is good for its own target.
    assert digest.verify(for_other.encode(), "GET", "id-1", secret, book,
                         target="/other") == "ok"


@pytest.mark.parametrize(("uri", "target", "matches"), [
    ("/x?y", "/x?y", True),
    ("/x", "/x?y", False),
    ("/x", "https://relay:8899/x", True),
    ("/", "https://relay:8899", True),
    ("/y", "https://relay:8899/x", False),
    ("*", "*", True),
])
def test_uri_matching(uri: str, target: str, matches: bool) -> None:
    assert digest.uri_matches(uri, target) is matches


def test_the_original_challenge_is_answered_too() -> None:
    """node-rendezvous's challenge (qop "auth, auth-int", no algorithm: MD5), as curl sees it."""
    head, _ = split(responses.challenge(upgrade=False, close=False, nonce="ab" * 16))
    line = head.header("www-authenticate")
    assert line is not None and f'opaque="{digest.OPAQUE}"' in line
    value = digest.digest_authorization(line, "hub-1", "x", "GET", "/", cnonce="c0ffee")
    assert value is not None
    ha1 = digest._hash("MD5", f"hub-1:{digest.REALM}:x")
    ha2 = digest._hash("MD5", "GET:/")
    expected = digest._hash("MD5", f"{ha1}:{'ab' * 16}:00000001:c0ffee:auth:{ha2}")
    assert f'response="{expected}"' in value and "qop=auth" in value


def test_basic_names_the_id_the_relay_reads() -> None:
    value = digest.basic_authorization("hub-1", "x")
    rest = value.partition(" ")[2]
    assert digest.basic_credentials(rest) == ("hub-1", "x")


def test_one_realm_and_one_opaque() -> None:
    assert responses.REALM is digest.REALM and responses.OPAQUE is digest.OPAQUE
    assert digest.OPAQUE == "a4f316df3e6c55a20ca82389083849ea"  # node-rendezvous's


# IDs and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("uuid", "valid"), [
    ("hub-1", True), ("a.b~c_d", True), ("Ümlaut", True), ("", False), ("a b", False),
    ("a\tb", False), ("a\r\nX: y", False), ("del\x7f", False),
])
def test_one_id_rule(uuid: str, valid: bool) -> None:
    assert valid_id(uuid) is valid


def test_every_error_is_a_rendezvous_error_and_drawn_in_the_tree() -> None:
    tree = errors.__doc__ or ""
    classes = [value for value in vars(errors).values()
               if isinstance(value, type) and issubclass(value, Exception)]
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, errors.RendezvousError), cls
        assert re.search(rf"\b{cls.__name__}\b", tree), f"{cls.__name__} missing from the tree"
    assert errors.HeadTooLong("x").status == 431 and errors.BareLineFeed("x").status == 400


def test_the_tunnel_applies_the_id_rule() -> None:
    from rendezvous.agent.mobile import Tunnel

    with pytest.raises(ValueError, match="invalid ID"):
        Tunnel("a b", ("127.0.0.1", 1))
    assert Tunnel("a.b", ("127.0.0.1", 1)).uuid == "a.b"
