"""What may be an ID: the one rule every part that sends or accepts an ID applies."""

from __future__ import annotations

import re

# An ID travels in the request target `CONNECT uuid:ID?response=...` (a space would end it) and
# in header values (a control character would end or fold the line). Nothing else is refused:
# IDs made for node-rendezvous are used as they are. (New IDs are held to a stricter pattern.)
ID_PATTERN = re.compile(r"[^\x00-\x20\x7f]+")


def valid_id(uuid: str) -> bool:
    """Whether ``uuid`` can name a hidden server: not empty, no space, no control character."""
    return ID_PATTERN.fullmatch(uuid) is not None


# A name is one DNS label (RFC 1123): it becomes the left-most label of a visitor's host name,
# NAME.DOMAIN. Stored and matched in lower case, as DNS compares names without case.
NAME_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def valid_name(name: str) -> bool:
    """Whether ``name`` (already lower case) is one DNS label: 1 to 63 letters, digits and
    hyphens, neither starting nor ending with a hyphen."""
    return NAME_PATTERN.fullmatch(name) is not None
