"""The two clients of the relay, libraries first with the CLI on top.

- ``hidden``: the hidden-server agent — keep connections parked at the relay and serve each
  pairing with a handler, or forward it to a local service (``rendezvous hidden``).
- ``mobile``: reach a hidden server through the relay — a local tunnel (``rendezvous open``)
  and preconfigured httpx clients (``rendezvous get``).
"""

from rendezvous.agent.hidden import AgentStatus, Handler, HiddenAgent, forward_to

__all__ = ["AgentStatus", "Handler", "HiddenAgent", "forward_to"]
