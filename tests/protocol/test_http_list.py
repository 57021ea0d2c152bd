"""protocol/digest.py's split_http_list is urllib's parse_http_list, and its digest_username the
user name of digest_fields, both faster: compared on real Digest headers and on random strings of
the characters that matter (quotes, commas, backslashes, equals signs, spaces)."""

from __future__ import annotations

import random
from urllib.request import parse_http_list

from rendezvous.protocol.digest import digest_fields, digest_username, split_http_list

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


def fields_username(text: str) -> str | None:
    fields = digest_fields(text)
    return fields.get("username") if fields is not None else None


def test_digest_user_name_is_the_one_in_the_fields() -> None:
    # digest_username (routing's) finds the user name without building every field: it must
    # agree with the fields on every value, well-formed or not.
    for text in [*REAL, 'username="a", username=b', 'realm="username=x", username="y"',
                 'uri="/?username=x"', 'username=""', "username=", ' username = "x"',
                 'username="x" ,\x85realm=y', 'username="\xe9"', "a=1, username=b ,"]:
        assert digest_username(text) == fields_username(text), repr(text)
    rng = random.Random(15)
    keys = ["username", "realm", "a", "user name", "username ", "Username", 'x"y', "u=v", ""]
    values = ['"id-1"', "id-2", '""', '"a,b"', '"a\\"b"', "a=b", "", '" x "', '"q', 'q"', "a b",
              '"\xe9\xa0"']
    separators = [",", ", ", " ,", ",,", " ", "\t,\x85"]
    for _ in range(20_000):
        fields = [f"{rng.choice(keys)}={rng.choice(values)}" for _ in range(rng.randrange(5))]
        text = (rng.choice(["", " "]) + "".join(f + rng.choice(separators) for f in fields[:-1])
                + (fields[-1] if fields else "") + rng.choice(["", " ", ","]))
        assert digest_username(text) == fields_username(text), repr(text)
