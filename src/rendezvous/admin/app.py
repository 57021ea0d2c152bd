"""The admin application, its listener, and ``run()`` for ``rendezvous admin``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web
from prometheus_client import CollectorRegistry

from rendezvous import logs, runtime
from rendezvous.admin import security, views
from rendezvous.admin.metrics import metrics_registry
from rendezvous.admin.state import STATE, AdminState
from rendezvous.config import AdminConfig, is_loopback_host
from rendezvous.errors import ConfigError
from rendezvous.registry import Registry, open_registry

if TYPE_CHECKING:
    from rendezvous.server.hub import Hub

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
# Our forms are a few short fields; anything bigger is not from our page.
MAX_REQUEST_BODY = 64 * 1024
# Seconds an open browser connection gets to finish when the admin page stops.
SHUTDOWN_TIMEOUT = 2.0


def template_environment() -> jinja2.Environment:
    """Jinja2 with autoescaping on, strict about undefined names, and our formatting filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = views.format_time
    env.filters["bytes"] = views.format_bytes
    env.filters["number"] = views.format_number
    env.globals["ago"] = views.format_ago
    return env


def build_app(
    config: AdminConfig,
    registry: Registry,
    hub: Hub[Any] | None = None,
    *,
    relay_up: Callable[[], bool] | None = None,
    relay_port: int | None = None,
) -> web.Application:
    """The admin application over ``registry``; with ``hub``, also the live relay numbers.

    ``relay_up`` tells /readyz whether the relay's listener accepts; ``relay_port`` is the
    relay's bound port, for provisioning files when ``config.relay.port`` is None.
    """
    app = web.Application(client_max_size=MAX_REQUEST_BODY)
    state = AdminState(
        config=config,
        registry=registry,
        templates=template_environment(),
        metrics=CollectorRegistry(auto_describe=False),
        hub=hub,
        relay_up=relay_up,
        relay_port=relay_port,
    )
    state.metrics = metrics_registry(state)
    if hub is not None:
        from rendezvous.admin.status import StatusSampler

        state.status = StatusSampler(hub)
    app[STATE] = state
    security.setup(app)
    app.add_routes(views.routes)
    app.router.add_static("/static/", STATIC, append_version=False)
    return app


class AdminSite:
    """The admin application listening on ``config.host``:``config.port`` on the running loop:
    ``await start()``, then ``await close()``."""

    def __init__(
        self,
        config: AdminConfig,
        registry: Registry,
        hub: Hub[Any] | None = None,
        *,
        relay_up: Callable[[], bool] | None = None,
        relay_port: int | None = None,
    ) -> None:
        self.config = config
        self.app = build_app(config, registry, hub, relay_up=relay_up, relay_port=relay_port)
        # No access log: the page polls every 2 s; actions and logins are logged as events.
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        self._started = False

    @property
    def port(self) -> int:
        """The port bound (useful when the config asked for port 0)."""
        addresses = self._runner.addresses
        assert addresses, "admin page not started"
        return int(addresses[0][1])

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; raise ConfigError when the address cannot be listened on."""
        config = self.config
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host or None, config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                f"cannot listen on admin address {config.host}:{config.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        self._started = True
        if config.password is not None and not is_loopback_host(config.host):
            logs.event("admin page is plain HTTP: reach it through TLS (a proxy or a tunnel)",
                       level=logging.WARNING)
        logs.event("admin listening", url=self.url,
                   login="password" if config.password is not None else "none (loopback)",
                   relay="live" if self.app[STATE].hub is not None else "none")

    async def close(self) -> None:
        """Stop listening and finish the requests in progress."""
        if self._started:
            self._started = False
            await self._runner.cleanup()

    async def __aenter__(self) -> AdminSite:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve_until_signalled(config: AdminConfig, registry_url: str) -> None:
    """Serve the admin page over the registry at ``registry_url`` until SIGINT or SIGTERM."""
    registry = open_registry(registry_url)
    try:
        site = AdminSite(config, registry)
        await site.start()
        stop = asyncio.Event()
        with runtime.signals(stop.set):
            try:
                await stop.wait()
            finally:
                await site.close()
    finally:
        await registry.close()
        logs.event("admin stopped")


def run(config: AdminConfig, registry_url: str, log_format: str = "text") -> int:
    """Run ``rendezvous admin`` to completion; returns the exit status (errors raise
    RendezvousError for the CLI to print)."""
    logs.configure_logging(log_format)
    # The standard loop, as before: the page needs no uvloop speed.
    runtime.run(serve_until_signalled(config, registry_url), use_uvloop=False)
    return 0
