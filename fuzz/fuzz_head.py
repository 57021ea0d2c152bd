#!/usr/bin/env python3
"""atheris (libFuzzer) target: the path a stranger's first bytes take through the relay.

``find_head_end`` -> ``parse_head`` -> ``route`` -> ``RequestHead.forwarded``, exactly as
``server/connection.py`` calls them. A finding is any exception other than a ``HeadError`` from
the parsing, any exception from routing, a head whose version is not HTTP/1.0 or 1.1, and a
forwarded head that carries Authorization or does not parse back to the same head. See
README.md in this folder for how to run it.
"""

from __future__ import annotations

import sys

import atheris

from rendezvous.protocol.head import HeadError, HeadTooLarge, find_head_end, parse_head
from rendezvous.protocol.routing import Challenge, Pair, Park, Refuse, route

# Coverage feedback from every Python function loaded by now: ours, and the stdlib parsers
# route() leans on (urllib.parse, urllib.request's parse_http_list, base64). httptools is C.
atheris.instrument_all()

HEAD_END = b"\r\n\r\n"


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    # The first byte picks the limits, so they are fuzzed too.
    max_head_size = 64 + (data[0] & 0x0F) * 1024
    max_headers = 1 + (data[0] >> 4) * 8
    data = data[1:]
    try:
        end = find_head_end(data, max_head_size)
    except HeadTooLarge:
        return
    if end < 0:
        assert HEAD_END not in data[:max_head_size]
        return
    try:
        head = parse_head(data[:end], max_headers)
    except HeadError:
        return
    assert head.version in ("1.0", "1.1"), head
    assert len(head.headers) <= max_headers, head
    decision = route(head)
    assert isinstance(decision, Park | Pair | Challenge | Refuse), decision
    forwarded = head.forwarded()
    for line in forwarded.split(b"\r\n")[1:]:
        assert line.split(b":", 1)[0].strip().lower() != b"authorization", forwarded
    again = parse_head(forwarded, max(max_headers, len(head.headers)))
    kept = tuple((k, v) for k, v in head.headers if k.lower() != b"authorization")
    assert (again.method, again.target, again.version, again.headers) == (
        head.method, head.target, head.version, kept), (head, again)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
