"""The rendezvous server: listener, per-connection protocol, parked pools and the relay."""

from rendezvous.server.app import RendezvousServer, run

__all__ = ["RendezvousServer", "run"]
