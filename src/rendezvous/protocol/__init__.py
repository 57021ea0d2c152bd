"""The I/O-free core: what the relay and the agents say to each other (docs/protocol.md).

    head.py       HeadReader: one request head from an untrusted peer, limits applied, the
                  bytes read past it handed back
    framing.py    where each message on a paired connection ends (per-request routing)
    routing.py    what a head asks for: park a hidden server, pair a visitor, or refuse
    responses.py  the bytes the relay writes, and the agents' reading of them
    digest.py     the visitor check (RFC 7616, server side) and the Digest client
    totp.py       the CONNECT token check
    ids.py        what an ID (or a hidden server's name) may be
    hostnames.py  named hidden servers: the name a visitor's host asks for, the visitor URL
    clienthello.py  SNI and ALPN of a TLS ClientHello (ACME: which context a handshake gets)
    plainhttp.py  what the ``--acme-http`` listener answers: HTTP-01, 308 to https

Nothing here imports asyncio, socket or ssl; callers feed bytes in and write bytes out.
"""
