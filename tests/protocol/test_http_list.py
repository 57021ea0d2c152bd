"""protocol/digest.py's split_http_list is urllib's parse_http_list, faster: compared on real
Digest headers and on random strings of the characters that matter (quotes, commas,
backslashes, equals signs, spaces)."""

from __future__ import annotations

import random
from urllib.request import parse_http_list

from rendezvous.protocol.digest import split_http_list

REAL = [
    'username="id-1", realm="rendezvous", nonce="abc", uri="/b?up=0&down=2", qop=auth, '
    'nc=00000001, cnonce="0a4f113b", response="1111", opaque="a4f3"',
    'username="a,b", uri="/x,y"',
    'username="unterminated, realm=x',
    'username="esc\\"aped", realm="x\\\\"',
    "",
    ",",
    "a,,b,",
    ' , a = "" , ',
]


def test_real_headers_split_as_urllib_does() -> None:
    for text in REAL:
        assert split_http_list(text) == parse_http_list(text), text


def test_random_strings_split_as_urllib_does() -> None:
    rng = random.Random(15)
    alphabet = 'ab=, "\\\\x\\t'
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        assert split_http_list(text) == parse_http_list(text), repr(text)
