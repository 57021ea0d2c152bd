"""What every view of the admin application shares: its settings, registry and relay."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web
from prometheus_client import CollectorRegistry

from rendezvous.config import DEFAULT_PORT, AdminConfig, RelayAddress
from rendezvous.protocol.hostnames import visitor_url
from rendezvous.registry import Registry

if TYPE_CHECKING:
    from rendezvous.admin.status import StatusSampler
    from rendezvous.server.hub import Hub


@dataclass(eq=False)
class AdminState:
    """The admin application's shared state (one per application, on its event loop)."""

    config: AdminConfig
    registry: Registry
    templates: jinja2.Environment
    metrics: CollectorRegistry
    hub: Hub[Any] | None = None  # None: no relay in this process (``rendezvous admin``)
    relay_up: Callable[[], bool] | None = None  # whether the relay's listener accepts
    relay_port: int | None = None  # the relay's bound port, for provisioning files
    status: StatusSampler | None = None
    registry_errors: int = 0  # failed registry calls made by the admin page itself
    # Serialises password checks, so failed guesses cost one LOGIN_FAILURE_DELAY each, in all.
    login_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def auth_required(self) -> bool:
        """Whether every page needs a logged-in session (a password is set)."""
        return self.config.password is not None

    def relay(self) -> RelayAddress:
        """Where provisioning files made here send hidden servers: the configured address,
        its port the relay's in this process when it names none."""
        relay = self.config.relay
        return replace(relay, port=relay.port or self.relay_port or DEFAULT_PORT)

    def visitor_url(self, name: str) -> str | None:
        """The URL visitors open for the entry named ``name``; None without a name or a
        --domain. (The relay's public port: a balancer's, or the one it binds.)"""
        if not name or not self.config.domain:
            return None
        return visitor_url(name, self.config.domain, self.relay().port or DEFAULT_PORT)


STATE: web.AppKey[AdminState] = web.AppKey("rendezvous_admin_state", AdminState)
