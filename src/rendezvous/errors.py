"""One exception tree for the whole package.

    RendezvousError
    ├── RegistryError              the registry backend failed (unreachable, corrupt)
    │   ├── UnknownEntry           no entry with that ID
    │   ├── DuplicateEntry         an entry with that ID already exists
    │   └── DuplicateName          another entry already has that name
    ├── ConfigError                a setting or file the user gave is unusable
    ├── ProvisioningError          a provisioning file is malformed
    ├── ProxyHeaderError           a PROXY protocol header is malformed or too large
    ├── ClientHelloError           a TLS ClientHello the relay peeks at is malformed or too large
    ├── HeadError                  a peer's request head cannot be served (``status``)
    │   ├── MalformedHead          400: not a valid HTTP/1.x request head
    │   │   └── BareLineFeed       400: lines end in LF alone, not CRLF
    │   ├── FramingError           400: a paired request's body framing cannot be followed
    │   └── HeadTooLarge           431: over a size limit
    │       ├── HeadTooLong        431: more bytes than max_head_size
    │       └── TooManyHeaders     431: more header lines than max_headers
    └── RelayError                 an agent could not use the relay
        ├── RelayUnreachable       mobile: no TCP/TLS connection, or it broke
        ├── RelayRefused           mobile: the relay answered instead of pairing
        └── ParkFailed             hidden: a CONNECT did not park
"""


class RendezvousError(Exception):
    """Base of every error this package raises on purpose."""


class RegistryError(RendezvousError):
    """The registry backend could not do what was asked (unreachable, corrupt data)."""


class UnknownEntry(RegistryError):
    """No registry entry has this ID."""

    def __init__(self, uuid: str) -> None:
        super().__init__(f"no hidden server with ID {uuid!r} in the registry")
        self.uuid = uuid


class DuplicateEntry(RegistryError):
    """An entry with this ID already exists."""

    def __init__(self, uuid: str) -> None:
        super().__init__(f"a hidden server with ID {uuid!r} already exists")
        self.uuid = uuid


class DuplicateName(RegistryError):
    """Another entry already has this name (names are unique, like IDs)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a hidden server named {name!r} already exists")
        self.name = name


class ConfigError(RendezvousError):
    """A setting, flag or file given by the user cannot be used."""


class ProvisioningError(RendezvousError):
    """A provisioning file is missing fields or malformed."""


class ProxyHeaderError(RendezvousError):
    """A PROXY protocol header (haproxy's v1 or v2) is malformed, unsupported or too large."""


class ClientHelloError(RendezvousError):
    """A TLS ClientHello read before the handshake is not one, is malformed or too large (the
    relay then lets OpenSSL handle it with its normal context)."""


class HeadError(RendezvousError):
    """The peer's head cannot be served; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedHead(HeadError):
    """Not a valid HTTP/1.x request head."""

    status = 400


class BareLineFeed(MalformedHead):
    """The head's lines end in a bare LF (RFC 9112 §2.2 lets a server refuse them, and we
    pass heads on as CRLF only): answered at once instead of waiting for a CRLF blank line."""


class FramingError(HeadError):
    """A message's framing cannot be followed (a bad chunk size, conflicting lengths): the
    relay cannot tell where the next message starts, so the connection must end."""

    status = 400


class HeadTooLarge(HeadError):
    """The head is longer than the size limit, or has more header lines than allowed."""

    status = 431


class HeadTooLong(HeadTooLarge):
    """The head is longer than ``max_head_size``."""


class TooManyHeaders(HeadTooLarge):
    """The head has more header lines than ``max_headers``."""


class RelayError(RendezvousError):
    """An agent (hidden or mobile) could not use the relay; the text says why."""


class RelayUnreachable(RelayError):
    """The relay could not be reached, or its TLS handshake failed; the text says which."""


class RelayRefused(RelayError):
    """The relay answered before pairing with something other than what the tunnel expects;
    ``data`` is that answer, to pass on to the local client."""

    def __init__(self, data: bytes, status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.data = data
        self.status = status
        self.reason = reason


class ParkFailed(RelayError):
    """A CONNECT that did not park; ``refused`` when the relay said no (not the network),
    ``retry_after`` the seconds a 429 asked us to wait."""

    def __init__(
        self, reason: str, *, refused: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused
        self.retry_after = retry_after
