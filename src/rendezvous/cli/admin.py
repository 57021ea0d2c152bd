"""``rendezvous admin``: the admin page alone, over the registry (no relay in this process)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from rendezvous import registrar
from rendezvous.cli.options import (
    Commands,
    Formatter,
    err,
    host_port,
    int_in,
    provisioning_options,
    runtime_options,
    seconds,
    store,
    store_options,
)
from rendezvous.config import (
    DEFAULT_ADMIN_FAILURE_INTERVAL,
    DEFAULT_ADMIN_FAILURES,
    DEFAULT_ADMIN_HOST,
    DEFAULT_ADMIN_PORT,
    ENV_ADMIN_PASSWORD,
    AdminConfig,
)


def admin_password_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--admin-password, for ``admin`` and ``serve --admin``."""
    p.add_argument(
        "--admin-password",
        metavar="PASSWORD",
        help=f"password of the admin page (default: ${ENV_ADMIN_PASSWORD}; the variable keeps it "
        "out of the process list). Required to listen on anything but loopback; with it, "
        "every page asks to log in",
    )
    p.add_argument(
        "--admin-password-failures",
        type=int_in(1),
        default=DEFAULT_ADMIN_FAILURES,
        metavar="N",
        help="wrong admin passwords one address may try, on the login form and /metrics "
        "together, before 429 (default: %(default)s)",
    )
    p.add_argument(
        "--admin-password-failure-interval",
        type=seconds(allow_zero=False),
        default=DEFAULT_ADMIN_FAILURE_INTERVAL,
        metavar="SECONDS",
        help="then one more every SECONDS (default: %(default)s)",
    )


def admin_access(args: argparse.Namespace, host: str, port: int,
                 metrics_per_id: bool = False) -> AdminConfig:
    """Who may use the page at ``host``:``port``: the password and its guess limit."""
    return AdminConfig(host=host, port=port, password=admin_password(args),
                       metrics_per_id=metrics_per_id,
                       password_failures=args.admin_password_failures,
                       password_failure_interval=args.admin_password_failure_interval)


def admin_password(args: argparse.Namespace) -> str | None:
    """The admin page's password: the flag, else the environment, else none."""
    given: str | None = args.admin_password
    if given is not None:
        return given
    return os.environ.get(ENV_ADMIN_PASSWORD) or None


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Add ``admin`` to ``commands``."""
    p = commands.add_parser(
        "admin",
        parents=[store_options(), provisioning_options(files=False),
                 runtime_options(uvloop=False)],
        formatter_class=Formatter,
        help="serve the admin page alone: manage hidden servers from a browser",
        description="Serve the admin page over the registry, without a relay (like\n"
        "node-rendezvous's registrar): list, add, rotate and remove hidden servers, and hand\n"
        "out their provisioning files. For live relay numbers use 'serve --admin' instead.",
    )
    p.add_argument(
        "--listen",
        type=host_port(DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT),
        default=(DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT),
        metavar="HOST:PORT",
        help=f"address of the page (default: {DEFAULT_ADMIN_HOST}:{DEFAULT_ADMIN_PORT})",
    )
    admin_password_option(p)
    p.set_defaults(handler=_admin)


def _admin(args: argparse.Namespace) -> int:
    from rendezvous.cli.configcmd import apply_relay_file

    apply_relay_file(args)  # the relay's registry and public address, from its relay.toml
    found = store(args)
    host, port = args.listen
    # Built first: a page that would be open to the network is refused before anything happens.
    access = admin_access(args, host, port)
    registrar.prepare_data_dir(found, create=True)
    public = registrar.public_address(found, host=args.server_host, port=args.server_port,
                                      ca_file=args.ca, no_ca=args.no_ca)
    err(f"registry: {registrar.redact(found.registry_url)}")
    err(f"provisioning files: {public.facts}")
    if public.warning is not None:
        err(f"warning: {public.warning}")

    # Imported here so the other commands start without loading aiohttp.
    from rendezvous.admin import run

    # Named entries' visitor URLs are under the domain the relay last started with.
    record = registrar.recall_relay(found.data_dir)
    domain = record.domain if record is not None else ""
    return run(replace(access, relay=public.relay, domain=domain), found.registry_url,
               args.log_format)
