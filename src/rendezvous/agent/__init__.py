"""The two clients of the relay, libraries first with the CLI on top.

- ``hidden``: the hidden-server agent — keep connections parked at the relay and serve each
  pairing with a handler, or forward it to a local service (``rendezvous hidden``).
- ``mobile``: reach a hidden server through the relay — a local tunnel (``rendezvous open``)
  and preconfigured httpx clients (``rendezvous get``; :func:`client` and :func:`async_client`,
  importable from here as the README shows).
- ``streams``: what both share on their sockets — the pump, a bounded close, TCP keepalive.
"""

from typing import TYPE_CHECKING, Any

from rendezvous.agent.hidden import AgentStatus, Handler, HiddenAgent, forward_to

if TYPE_CHECKING:
    from rendezvous.agent.mobile import async_client, client

__all__ = ["AgentStatus", "Handler", "HiddenAgent", "async_client", "client", "forward_to"]


def __getattr__(name: str) -> Any:
    # The mobile client imports httpx, which a hidden-server agent never needs: load it on use.
    if name in ("client", "async_client"):
        from rendezvous.agent import mobile

        return getattr(mobile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
