"""The two clients of the relay, libraries first with the CLI on top.

- ``mobile``: reach a hidden server through the relay — a local tunnel (``rendezvous open``)
  and preconfigured httpx clients (``rendezvous get``).
"""
