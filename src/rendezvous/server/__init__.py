"""The rendezvous server: listener, per-connection protocol, parked pools and the relay.

    app.py         the listener: bind, TLS, shutdown, certificate reload; ``run()`` for the CLI
    connection.py  one accepted connection: its callbacks, the TLS upgrade, head dispatch
    leg.py         what every leg is: its state and the helpers all parts use
    hidden_side.py a CONNECT: token check, then parking
    mobile_side.py a visitor's request meets a parked connection
    relaying.py    paired legs: bytes both ways, following each direction's HTTP framing
    hub.py         parked pools (LIFO), waiting visitors, counters: plain state over a Leg protocol
    cluster.py     several nodes on one Redis (imported only with ``--cluster``)
    ratelimit.py   budgets of failed guesses per address and per ID
    local.py       what the relay tells commands on its machine (relay.json, the status socket)
    revocation.py  registry changes made anywhere reach the connections parked here
    certificates.py ``--acme``: order, renew, answer challenges; one certificate per name
    certstore.py   where ACME state lives: DATA_DIR/acme/, or the cluster's Redis (its lock)
    acme_http.py   the ``--acme-http`` listener: HTTP-01 answers, redirects to https
"""

from rendezvous.server.app import RendezvousServer, run

__all__ = ["RendezvousServer", "run"]
