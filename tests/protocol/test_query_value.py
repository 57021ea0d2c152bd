"""protocol/routing.py reads a CONNECT's ``response`` and ``proxy`` (and an Upgrade's
``rendezvous``) as ``parse_qs(query, keep_blank_values=True)`` would, without building the whole
dict: compared on real targets and on random strings of the characters that matter."""

from __future__ import annotations

import random
from urllib.parse import parse_qs

from rendezvous.protocol.routing import Park, _query_value, _route_connect


def urllib_value(query: str, name: str) -> str | None:
    values = parse_qs(query, keep_blank_values=True).get(name)
    return values[0] if values else None


def test_real_queries_read_as_urllib_does() -> None:
    for query in ("response=123456", "response=123456&proxy=2", "proxy=1&response=00",
                  "response=&response=1", "response", "a=1&&response=%31%32+3", "", "&",
                  "res%70onse=9", "response=1;proxy=2", "response=%ZZ&proxy=%C3%A9"):
        for name in ("response", "proxy", "rendezvous"):
            assert _query_value(query, name) == urllib_value(query, name), (query, name)


def test_random_queries_read_as_urllib_does() -> None:
    rng = random.Random(15)
    alphabet = "ab=&+%2x0;\u00e9"
    for _ in range(20_000):
        query = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 16)))
        for name in ("a", "b", "a b", "", "ab"):
            assert _query_value(query, name) == urllib_value(query, name), (query, name)


def test_connect_target_fields() -> None:
    assert _route_connect("uuid:id-1?response=123456&proxy=2") == Park("id-1", "123456", 2)
    assert _route_connect("uuid:id-1?proxy=3&response=1%32") == Park("id-1", "12", 0)
