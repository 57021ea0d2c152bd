"""rendezvous-relay: reach HTTP servers hidden behind NAT through a public TLS relay.

The wire protocol is node-rendezvous's (written down in docs/protocol.md):
hidden servers park ``CONNECT uuid:ID?response=TOTP`` connections, mobile clients send an
ordinary HTTPS request naming the ID, and the server splices the two byte streams.
"""

__version__ = "0.1.0"
