#!/usr/bin/env python3
"""atheris (libFuzzer) target: the path a stranger's first bytes take through the relay.

``find_head_end`` -> ``parse_head`` -> ``route`` -> ``RequestHead.forwarded``, exactly as
``server/connection.py`` calls them. Any exception other than a ``HeadError`` from the parsing
is a finding, as is a forwarded head that carries Authorization or does not parse back to the
same head. See README.md in this folder for how to run it.

Known bugs (reported, tests in tests/fuzz/ mark them xfail) are tolerated, so a run keeps
looking for new ones, unless ``FUZZ_STRICT`` names them (``route``, ``version``, or ``1`` for
both):

* ``route``: route() lets exceptions of the stdlib parsers it calls (urllib.parse and the
  ipaddress check inside it, urllib.request's parse_keqv_list, base64) escape;
* ``version``: parse_head accepts HTTP/0.9 and HTTP/2.0 request lines (and the round trip of a
  version-less line is skipped).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback

import atheris

from rendezvous.protocol.head import HeadError, HeadTooLarge, find_head_end, parse_head
from rendezvous.protocol.routing import Challenge, Pair, Park, Refuse, route

# Coverage feedback from every Python function loaded by now: ours, and the stdlib parsers
# route() leans on (urllib.parse, urllib.request's parse_http_list, base64). httptools is C.
atheris.instrument_all()

_STRICT = set(os.environ.get("FUZZ_STRICT", "").split(","))
STRICT_ROUTE = bool(_STRICT & {"1", "route"})
STRICT_VERSION = bool(_STRICT & {"1", "version"})
HEAD_END = b"\r\n\r\n"
_STDLIB = sysconfig.get_paths()["stdlib"].replace(os.sep, "/") + "/"


def _known_route_escape(exc: BaseException) -> bool:
    """Raised inside the standard library (urllib, base64, ipaddress) called from routing.py."""
    if STRICT_ROUTE or not isinstance(exc, ValueError | IndexError):
        return False
    files = [frame.filename.replace(os.sep, "/")
             for frame in traceback.extract_tb(exc.__traceback__)]
    last = max((i for i, name in enumerate(files)
                if name.endswith("rendezvous/protocol/routing.py")), default=None)
    below = files[last + 1:] if last is not None else []
    return bool(below) and all(name.startswith(_STDLIB) for name in below)


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
    if STRICT_VERSION:
        assert head.version in ("1.0", "1.1"), head
    try:
        decision = route(head)
    except (ValueError, IndexError) as exc:
        if not _known_route_escape(exc):
            raise
        decision = None
    if decision is not None:
        assert isinstance(decision, Park | Pair | Challenge | Refuse), decision
    forwarded = head.forwarded()
    for line in forwarded.split(b"\r\n")[1:]:
        assert line.split(b":", 1)[0].strip().lower() != b"authorization", forwarded
    if head.version == "0.9" and not STRICT_VERSION:
        return
    again = parse_head(forwarded, max(max_headers, len(head.headers)))
    kept = tuple((k, v) for k, v in head.headers if k.lower() != b"authorization")
    assert (again.method, again.target, again.version, again.headers) == (
        head.method, head.target, head.version, kept), (head, again)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
