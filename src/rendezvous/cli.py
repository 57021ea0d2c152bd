"""The ``rendezvous`` command: parses arguments into config and calls the parts, nothing else.

    rendezvous serve                 run the relay
    rendezvous users add|list|show|rotate|remove
                                     manage hidden servers in the registry
    rendezvous cert                  make a self-signed certificate
    rendezvous admin                 serve the admin page alone (manage hidden servers)
    rendezvous open ID               reach a hidden server from a local address (like ssh -L)
    rendezvous get ID PATH           fetch one URL from a hidden server (like curl)
    rendezvous hidden                run a hidden server's agent: park at the relay, forward
                                     each pairing to a local service

Every error this package raises on purpose prints one line, ``rendezvous: error: ...``, and
exits with status 2 — the status argparse uses for a bad command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from uuid import uuid4

from rendezvous import __version__
from rendezvous.config import (
    DEFAULT_ADMIN_HOST,
    DEFAULT_ADMIN_PORT,
    DEFAULT_CLUSTER_TTL,
    DEFAULT_DATA_DIR,
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEAD_SIZE,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_PAIR_WAIT,
    DEFAULT_PARKED_TIMEOUT,
    DEFAULT_POOL_SIZE,
    DEFAULT_PORT,
    DEFAULT_SETTLE,
    ENV_ADMIN_PASSWORD,
    PER_ADDRESS_BURST,
    PER_ADDRESS_INTERVAL,
    PER_ID_BURST,
    PER_ID_INTERVAL,
    AdminConfig,
    ClusterConfig,
    GuessLimits,
    Limits,
    RelayAddress,
    ServerConfig,
    TLSConfig,
    default_registry_url,
)
from rendezvous.errors import (
    ConfigError,
    ProvisioningError,
    RegistryError,
    RendezvousError,
    UnknownEntry,
)
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.provisioning import (
    MAX_DIGITS,
    MIN_DIGITS,
    default_server_host,
    provisioning_document,
    relay_ca,
    self_signed_pem,
    write_provisioning,
)
from rendezvous.registry import Entry, Registry, new_secret, open_registry
from rendezvous.registry.base import DEFAULT_DIGITS, DEFAULT_STEP
from rendezvous.tls import (
    CERT_FILE,
    DEFAULT_DAYS,
    KEY_FILE,
    cert_names,
    ensure_self_signed,
    generate_self_signed,
    is_self_signed,
    read_cert_pem,
    server_ssl_context,
)

PROG = "rendezvous"
ENV_DATA_DIR = "RENDEZVOUS_DATA_DIR"
ENV_REGISTRY = "RENDEZVOUS_REGISTRY"
EXIT_ERROR = 2
# An operator's command should fail, not hang, when the registry's host drops packets.
REGISTRY_TIMEOUT = 10.0
# IDs travel in `CONNECT uuid:ID?...`, in Digest/Basic user names and in file names: keep new ones
# to URL-unreserved characters so none of those needs quoting.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")

T = TypeVar("T")
Handler = Callable[[argparse.Namespace], int]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps our hand-wrapped descriptions and gives option names room."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


# ---------------------------------------------------------------------------- argument types


ENV_CLUSTER_KEY = "RENDEZVOUS_CLUSTER_KEY"


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {value}")
        return value

    return parse


def _seconds(*, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not value >= 0 or value == float("inf") or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"must be {'0 or more' if allow_zero else 'more than 0'} seconds, not {text}"
            )
        return value

    return parse


# ---------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``serve``, ``users ...`` and ``cert``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        description="A rendezvous relay: reach HTTP servers hidden behind NAT through a public\n"
        "TLS relay, compatible with node-rendezvous.",
        epilog="Run 'rendezvous COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_users(commands)
    _add_admin(commands)
    _add_cert(commands)
    _add_open(commands)
    _add_get(commands)
    _add_hidden(commands)
    return parser


def _registry_options() -> argparse.ArgumentParser:
    """--data-dir and --registry, shared by ``serve`` and every ``users`` command."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("registry")
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"folder for the registry, the self-signed certificate and provisioning files "
        f"(default: ${ENV_DATA_DIR}, else ./{DEFAULT_DATA_DIR})",
    )
    group.add_argument(
        "--registry",
        metavar="URL",
        help="registry of hidden servers: sqlite:///PATH, redis://HOST:PORT/DB (also "
        f"node-rendezvous's database) or memory:// (default: ${ENV_REGISTRY}, else "
        "sqlite:///DIR/registry.sqlite3)",
    )
    return common


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "serve",
        parents=[_registry_options()],
        formatter_class=_Formatter,
        help="run the relay",
        description="Run the relay. Without --cert or --no-tls it uses DIR/cert.pem and\n"
        "DIR/key.pem, creating a self-signed pair on first run; provisioning files made\n"
        "by 'rendezvous users add' carry that certificate for hidden servers to trust.",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument(
        "--port",
        type=_int_in(0, 65535),
        default=DEFAULT_PORT,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    tls = p.add_argument_group("TLS")
    tls.add_argument("--cert", metavar="FILE", type=Path, help="certificate chain (PEM)")
    tls.add_argument("--key", metavar="FILE", type=Path, help="private key of --cert (PEM)")
    tls.add_argument(
        "--public-host",
        metavar="NAME",
        action="append",
        default=[],
        help="name or address clients use to reach the relay; repeatable. Added to the "
        "self-signed certificate when it is created (ignored with --cert or --no-tls)",
    )
    tls.add_argument(
        "--no-tls",
        action="store_true",
        help="speak plain TCP, for a relay behind a TLS-terminating balancer",
    )
    limits = p.add_argument_group("limits")
    limits.add_argument(
        "--pool-size",
        type=_int_in(1),
        default=DEFAULT_POOL_SIZE,
        metavar="N",
        help="parked connections kept per hidden server; 1 behaves like node-rendezvous "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--pair-wait",
        type=_seconds(allow_zero=True),
        default=DEFAULT_PAIR_WAIT,
        metavar="SECONDS",
        help="how long a client waits for a parked connection before 404 (default: %(default)s)",
    )
    limits.add_argument(
        "--settle",
        type=_seconds(allow_zero=True),
        default=DEFAULT_SETTLE,
        metavar="SECONDS",
        help="how long a freshly parked connection rests before it is paired "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--head-timeout",
        type=_seconds(allow_zero=False),
        default=DEFAULT_HEAD_TIMEOUT,
        metavar="SECONDS",
        help="time to finish the TLS handshake and send a request head (default: %(default)s)",
    )
    limits.add_argument(
        "--max-head-size",
        type=_int_in(1),
        default=DEFAULT_MAX_HEAD_SIZE,
        metavar="BYTES",
        help="largest request head; beyond it 431 (default: %(default)s)",
    )
    limits.add_argument(
        "--max-headers",
        type=_int_in(1),
        default=DEFAULT_MAX_HEADERS,
        metavar="N",
        help="most header lines in a request head; beyond it 431 (default: %(default)s)",
    )
    limits.add_argument(
        "--max-connections",
        type=_int_in(1),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="most open client connections (default: %(default)s)",
    )
    limits.add_argument(
        "--max-per-address",
        type=_int_in(1),
        default=DEFAULT_MAX_PER_ADDRESS,
        metavar="N",
        help="most open connections from one IP address (default: %(default)s)",
    )
    limits.add_argument(
        "--parked-timeout",
        type=_seconds(allow_zero=False),
        default=DEFAULT_PARKED_TIMEOUT,
        metavar="SECONDS",
        help="close a connection parked unpaired this long (default: %(default)s)",
    )
    guesses = p.add_argument_group(
        "failed CONNECTs",
        "Wrong tokens and unknown IDs are limited by token buckets, per source address and per "
        "ID; past them a CONNECT gets 429 with Retry-After and its token is not even checked. "
        "An address that parked for an ID skips that ID's bucket.",
    )
    guesses.add_argument("--failures-per-address", type=_int_in(1), default=PER_ADDRESS_BURST,
                         metavar="N", help="burst per address (default: %(default)s)")
    guesses.add_argument("--failure-interval-per-address", type=_seconds(allow_zero=False),
                         default=PER_ADDRESS_INTERVAL, metavar="SECONDS",
                         help="then one more every SECONDS (default: %(default)s)")
    guesses.add_argument("--failures-per-id", type=_int_in(1), default=PER_ID_BURST,
                         metavar="N", help="burst per ID (default: %(default)s)")
    guesses.add_argument("--failure-interval-per-id", type=_seconds(allow_zero=False),
                         default=PER_ID_INTERVAL, metavar="SECONDS",
                         help="then one more every SECONDS (default: %(default)s)")
    cluster = p.add_argument_group(
        "cluster",
        "Several relay nodes sharing one Redis: a node pairs a client with a hidden server parked "
        "on another node by handing the request to it over an internal listener (mutual TLS on "
        "the cluster key). Without --cluster nothing changes.",
    )
    cluster.add_argument("--cluster", metavar="REDIS_URL",
                         help="the cluster's Redis, e.g. redis://10.0.0.2:6379/1")
    cluster.add_argument("--node-id", metavar="ID",
                         help="this node's unique name in the cluster (default: the host name)")
    cluster.add_argument("--internal", metavar="HOST:PORT", default="127.0.0.1:8900",
                         help="internal listener for other nodes; keep it on a private network "
                              "(default: %(default)s)")
    cluster.add_argument("--advertise", metavar="HOST:PORT",
                         help="address other nodes dial (default: --internal; required when "
                              "--internal binds all interfaces)")
    cluster.add_argument("--cluster-key", metavar="KEY", default=os.environ.get(ENV_CLUSTER_KEY),
                         help=f"shared secret of the nodes (default: ${ENV_CLUSTER_KEY})")
    cluster.add_argument("--cluster-ttl", metavar="SECONDS", type=_seconds(allow_zero=False),
                         default=DEFAULT_CLUSTER_TTL,
                         help="a node that stops heartbeating is forgotten after this long "
                              "(default: %(default)s)")
    run = p.add_argument_group("runtime")
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as JSON objects (default: %(default)s)",
    )
    run.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio event loop")
    _admin_page_options(p)
    p.set_defaults(handler=_serve)


def _output_options() -> argparse.ArgumentParser:
    """Where a provisioning file goes and what it says about the relay (add, rotate)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("provisioning file")
    group.add_argument(
        "--server-host",
        metavar="HOST",
        help="relay host the hidden server connects to (default: the first public name in "
        "DIR/cert.pem, else this machine's FQDN)",
    )
    group.add_argument(
        "--server-port",
        type=_int_in(1, 65535),
        default=DEFAULT_PORT,
        metavar="PORT",
        help="relay port the hidden server connects to (default: %(default)s)",
    )
    ca = group.add_mutually_exclusive_group()
    ca.add_argument(
        "--ca",
        metavar="FILE",
        type=Path,
        help="PEM certificate the hidden server must trust for the relay (default: DIR/cert.pem "
        "if it exists and is self-signed, else none)",
    )
    ca.add_argument(
        "--no-ca",
        action="store_true",
        help="put no certificate in the file: the relay's chains to a public CA",
    )
    group.add_argument(
        "--out",
        metavar="FILE",
        type=Path,
        help="write the file here, mode 0600 (default: DIR/provision/ID.json)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="print the document to stdout instead of writing a file (with --out: both)",
    )
    return common


_USERS_EPILOG = (
    "Exit status: 0 on success; 2 on any error, among them an unknown ID, an ID that\n"
    "already exists and an unreachable registry."
)


def _add_users(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = commands.add_parser(
        "users",
        formatter_class=_Formatter,
        help="manage hidden servers in the registry",
        description="Add, list, show, rotate and remove the hidden servers the relay accepts.\n"
        "Changes take effect at once, also on a running relay.",
        epilog=_USERS_EPILOG,
    )
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    registry = _registry_options()
    output = _output_options()

    def action(name: str, handler: Handler, help: str, *parents: argparse.ArgumentParser) -> Any:
        p = actions.add_parser(
            name,
            parents=[registry, *parents],
            formatter_class=_Formatter,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=_USERS_EPILOG,
        )
        p.set_defaults(handler=handler)
        return p

    add = action("add", _users_add, "add a hidden server and write its provisioning file", output)
    add.add_argument("--label", default="", help="a name for people, e.g. 'living-room hub'")
    add.add_argument(
        "--uuid",
        metavar="ID",
        help="the hidden server's ID: letters, digits and . _ ~ - (default: a random UUID)",
    )
    add.add_argument(
        "--step",
        type=_int_in(1, 3600),
        default=DEFAULT_STEP,
        metavar="SECONDS",
        help="TOTP time step (default: %(default)s)",
    )
    add.add_argument(
        "--digits",
        type=int,
        choices=range(MIN_DIGITS, MAX_DIGITS + 1),
        default=DEFAULT_DIGITS,
        help="TOTP code length, 6 to 8 (default: %(default)s)",
    )
    add.add_argument(
        "--visitor-password",
        metavar="PASSWORD",
        help="make visitors log in: the relay checks their Digest (or Basic) password before "
        "pairing (default: none; any password, as node-rendezvous)",
    )

    lst = action("list", _users_list, "list the hidden servers")
    lst.add_argument("--json", action="store_true", help="print a JSON array (no secrets)")

    show = action("show", _users_show, "show one hidden server")
    show.add_argument("id", metavar="ID")
    show.add_argument("--secret", action="store_true", help="include the base32 TOTP secret")
    show.add_argument("--json", action="store_true", help="print a JSON object")

    rotate = action(
        "rotate",
        _users_rotate,
        "give a hidden server a new secret and write its new provisioning file",
        output,
    )
    rotate.add_argument("id", metavar="ID")

    visitor = action(
        "visitor",
        _users_visitor,
        "set or clear the password visitors of a hidden server must log in with",
    )
    visitor.add_argument("id", metavar="ID")
    choice = visitor.add_mutually_exclusive_group(required=True)
    choice.add_argument("--password", help="the new visitor password (Digest user name: ID)")
    choice.add_argument("--off", action="store_true",
                        help="no visitor check: any password is accepted again")

    remove = action("remove", _users_remove, "remove a hidden server; it can no longer park")
    remove.add_argument("id", metavar="ID")


def _add_cert(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "cert",
        formatter_class=_Formatter,
        help="make a self-signed certificate",
        description="Write a self-signed certificate (ECDSA P-256) and its key as cert.pem and\n"
        "key.pem (mode 0600), e.g. for 'serve --cert DIR/cert.pem --key DIR/key.pem'.",
    )
    p.add_argument(
        "--host",
        dest="hosts",
        metavar="NAME_OR_IP",
        action="append",
        required=True,
        help="a DNS name or IP address the certificate covers; repeatable, the first is its CN",
    )
    p.add_argument("--out-dir", metavar="DIR", type=Path, required=True, help="folder to write to")
    p.add_argument(
        "--days",
        type=_int_in(1),
        default=DEFAULT_DAYS,
        help="validity in days (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace cert.pem and key.pem if present")
    p.set_defaults(handler=_cert)


# ---------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the ``rendezvous`` command with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except RendezvousError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `rendezvous users list | head`: the reader left, which is not an error. Point stdout
        # at devnull so the interpreter's final flush does not complain a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


# ---------------------------------------------------------------------------- shared helpers


def _data_dir(args: argparse.Namespace) -> Path:
    given: Path | None = args.data_dir
    return given or Path(os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR)


def _registry_url(args: argparse.Namespace, data_dir: Path) -> str:
    given: str | None = args.registry
    return given or os.environ.get(ENV_REGISTRY) or default_registry_url(data_dir)


def _prepare_data_dir(data_dir: Path, registry_url: str, *, create: bool) -> None:
    """Make sure the default SQLite registry's folder exists (create it, or explain its absence).

    A command that only reads stops here rather than creating an empty registry in a mistyped
    folder and reporting that it holds nobody.
    """
    if registry_url != default_registry_url(data_dir):
        return
    if data_dir.is_dir():
        return
    if not create:
        raise ConfigError(
            f"data folder {data_dir} does not exist (pass --data-dir or set {ENV_DATA_DIR})"
        )
    try:
        # 0700: the folder holds the registry of secrets, the private key, provisioning files.
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data folder {data_dir}: {exc.strerror or exc}") from exc


def _redact(url: str) -> str:
    """``url`` with any password masked, for banners and messages."""
    if urlsplit(url).password is None:
        return url
    # Only Redis URLs carry passwords; importing its backend only then keeps `users` quick.
    from rendezvous.registry.redis import redacted

    return redacted(url)


def _with_registry(url: str, op: Callable[[Registry], Awaitable[T]]) -> T:
    """Open the registry at ``url``, check it answers, run ``op`` on it and close it."""

    async def run() -> T:
        registry = open_registry(url)
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT):
                await registry.ping()
                return await op(registry)
        except TimeoutError:
            raise RegistryError(
                f"registry {_redact(url)} did not answer within {REGISTRY_TIMEOUT:g} s"
            ) from None
        finally:
            # Failing to release a connection in a one-shot process harms nothing, and must
            # not hide the error that brought us here.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REGISTRY_TIMEOUT):
                    await registry.close()

    return asyncio.run(run())


def _local_time(timestamp: float) -> str:
    if not timestamp:
        return "-"  # node-rendezvous's records carry no timestamps
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return moment.isoformat(timespec="seconds")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    registry_url = _registry_url(args, data_dir)
    cert: Path | None = args.cert
    key: Path | None = args.key
    public_hosts: list[str] = args.public_host
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together: give both or neither")
    if args.no_tls and cert is not None:
        raise ConfigError("--no-tls and --cert contradict each other: choose one")
    if public_hosts and (args.no_tls or cert is not None):
        _err("warning: --public-host only names a self-signed certificate; ignored here")
    admin = _serve_admin(args)  # an exposed admin page is refused before any file is made
    _prepare_data_dir(data_dir, registry_url, create=True)

    tls: TLSConfig | None
    if args.no_tls:
        tls = None
    elif cert is not None and key is not None:
        tls = TLSConfig(cert_file=cert, key_file=key)
    else:
        tls = ensure_self_signed(data_dir, public_hosts, warn=lambda m: _err(f"warning: {m}"))
    if tls is not None:
        server_ssl_context(tls)  # a bad pair fails here, with its file names, before the banner

    config = ServerConfig(
        host=args.host,
        port=args.port,
        tls=tls,
        registry_url=registry_url,
        limits=Limits(
            pool_size=args.pool_size,
            pair_wait=args.pair_wait,
            settle=args.settle,
            head_timeout=args.head_timeout,
            max_head_size=args.max_head_size,
            max_headers=args.max_headers,
            max_connections=args.max_connections,
            max_per_address=args.max_per_address,
            parked_timeout=args.parked_timeout,
            guesses=GuessLimits(
                per_address_burst=args.failures_per_address,
                per_address_interval=args.failure_interval_per_address,
                per_id_burst=args.failures_per_id,
                per_id_interval=args.failure_interval_per_id,
            ),
        ),
        log_format=args.log_format,
        use_uvloop=not args.no_uvloop,
        cluster=_cluster_config(args),
        admin=admin and replace(admin, relay=_serve_relay_address(args, data_dir, tls)),
    )
    _banner(config, data_dir)

    # Imported here so `users` and `cert` start fast and work without the server's dependencies.
    from rendezvous.server.app import run

    return run(config)


def _banner(config: ServerConfig, data_dir: Path) -> None:
    _err(f"registry: {_redact(config.registry_url)}")
    if config.tls is None:
        _err("TLS: off (plain TCP; terminate TLS in front of the relay)")
    else:
        cert_file = config.tls.cert_file
        note = ""
        with contextlib.suppress(RendezvousError, OSError):
            if is_self_signed(cert_file.read_bytes()):
                note = " (self-signed: provisioning files carry it for hidden servers to trust)"
        _err(f"certificate: {cert_file.resolve()}{note}")
    hint = f"{PROG} users add --label NAME --data-dir {data_dir.resolve()}"
    if config.registry_url != default_registry_url(data_dir):
        hint += f" --registry {_redact(config.registry_url)}"
    _err(f"to add a hidden server: {hint}")


# ---------------------------------------------------------------------------- users


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _out_path(args: argparse.Namespace, data_dir: Path, uuid: str) -> Path | None:
    """Where the provisioning file goes; None when it only goes to stdout."""
    out: Path | None = args.out
    if out is not None:
        return out
    if args.json:
        return None
    if not _ID_PATTERN.fullmatch(uuid):
        # An old ID (say, from node-rendezvous's Redis) may not be a safe file name.
        raise ConfigError(f"ID {uuid!r} cannot be a file name: pass --out FILE")
    return data_dir / "provision" / f"{uuid}.json"


# What a registry change returns: the new entry, and how to take the change back.
Change = tuple[Entry, Callable[[], Awaitable[None]]]


def _provision(
    args: argparse.Namespace,
    data_dir: Path,
    registry_url: str,
    uuid: str,
    change: Callable[[Registry], Awaitable[Change]],
) -> tuple[Entry, Path | None, str]:
    """Make ``change`` to the registry, then write the new entry's provisioning file.

    Should the file fail to be written, the change is taken back, so no hidden server is left
    with a secret that nobody holds.
    """
    host: str = args.server_host or default_server_host(data_dir / CERT_FILE)
    port: int = args.server_port
    ca, ca_source = relay_ca(data_dir, args.ca, no_ca=args.no_ca)
    out = _out_path(args, data_dir, uuid)

    async def op(registry: Registry) -> Entry:
        entry, undo = await change(registry)
        doc = provisioning_document(entry, host, port, ca)
        if out is not None:
            try:
                write_provisioning(doc, out)
            except ProvisioningError:
                await undo()
                raise
        if args.json:
            print(json.dumps(doc, indent=2))
        return entry

    entry = _with_registry(registry_url, op)
    if _is_loopback(host):
        _err(f"warning: server host {host!r} reaches only this machine; pass --server-host")
    return entry, out, f"server {host}:{port}, CA {ca_source}"


def _report(action: str, entry: Entry, out: Path | None, facts: str, json_out: bool) -> None:
    """Say what was done; on stderr when stdout carries the JSON document."""
    stream = sys.stderr if json_out else sys.stdout
    label = f" ({_one_line(entry.label)})" if entry.label else ""
    print(f"{action} hidden server {entry.uuid}{label}", file=stream)
    if out is not None:
        print(f"  provisioning file {out} (mode 0600: it holds the secret)", file=stream)
    print(f"  {facts}", file=stream)


def _users_add(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    registry_url = _registry_url(args, data_dir)
    uuid: str = args.uuid if args.uuid is not None else str(uuid4())
    if not _ID_PATTERN.fullmatch(uuid):
        raise ConfigError(
            f"invalid ID {uuid!r}: use 1 to 128 letters, digits and . _ ~ -, starting with a "
            "letter or digit"
        )
    entry = Entry(
        uuid=uuid, base32=new_secret(), step=args.step, digits=args.digits, label=args.label,
        visitor=(VisitorSecret.from_password(uuid, args.visitor_password)
                 if args.visitor_password else None),
    )
    _prepare_data_dir(data_dir, registry_url, create=True)

    async def change(registry: Registry) -> Change:
        await registry.add(entry)
        return entry, lambda: registry.remove(uuid)

    added, out, facts = _provision(args, data_dir, registry_url, uuid, change)
    _report("added", added, out, facts, args.json)
    return 0


def _users_rotate(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    registry_url = _registry_url(args, data_dir)
    uuid: str = args.id
    _prepare_data_dir(data_dir, registry_url, create=False)

    async def change(registry: Registry) -> Change:
        old = await _get(registry, uuid)
        new = old.rotated()
        await registry.replace(new)
        return new, lambda: registry.replace(old)

    entry, out, facts = _provision(args, data_dir, registry_url, uuid, change)
    _report("rotated the secret of", entry, out, facts, args.json)
    stream = sys.stderr if args.json else sys.stdout
    print("  the old secret no longer works: give the hidden server its new file", file=stream)
    return 0


def _users_visitor(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    registry_url = _registry_url(args, data_dir)
    uuid: str = args.id
    _prepare_data_dir(data_dir, registry_url, create=False)
    password: str | None = None if args.off else args.password
    if password is not None and not password:
        raise ConfigError("the visitor password is empty (use --off for no check)")
    secret = VisitorSecret.from_password(uuid, password) if password is not None else None

    async def op(registry: Registry) -> None:
        old = await _get(registry, uuid)
        await registry.replace(dataclasses.replace(old, visitor=secret, updated=time.time()))

    _with_registry(registry_url, op)
    if secret is None:
        print(f"hidden server {uuid}: visitors are no longer checked")
    else:
        print(f"hidden server {uuid}: visitors must now log in (user name {uuid}, the password "
              "you gave), from the hidden server's next parked connection on")
    return 0


async def _get(registry: Registry, uuid: str) -> Entry:
    entry = await registry.get(uuid)
    if entry is None:
        raise UnknownEntry(uuid)
    return entry


def _public_record(entry: Entry, *, secret: bool) -> dict[str, Any]:
    """The entry for display: times in local ISO form, the secret only when asked for."""
    record = entry.to_record()
    record["created"] = _local_time(entry.created)
    record["updated"] = _local_time(entry.updated)
    if not secret:
        del record["authParams"]["base32"]
        record.pop("visitor", None)
    record["visitorCheck"] = entry.visitor is not None
    return record


def _users_list(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    registry_url = _registry_url(args, data_dir)
    _prepare_data_dir(data_dir, registry_url, create=False)

    async def op(registry: Registry) -> list[Entry]:
        return await registry.list()

    entries = _with_registry(registry_url, op)
    if args.json:
        print(json.dumps([_public_record(e, secret=False) for e in entries], indent=2))
        return 0
    if not entries:
        _err(f"no hidden servers in {_redact(registry_url)}")
        return 0
    rows = [("ID", "LABEL", "CREATED")]
    rows += [(e.uuid, _one_line(e.label), _local_time(e.created)) for e in entries]
    id_width = max(len(r[0]) for r in rows)
    label_width = max(len(r[1]) for r in rows)
    for uuid, label, created in rows:
        print(f"{uuid:<{id_width}}  {label:<{label_width}}  {created}")
    return 0


def _users_show(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    registry_url = _registry_url(args, data_dir)
    uuid: str = args.id
    _prepare_data_dir(data_dir, registry_url, create=False)

    async def op(registry: Registry) -> Entry:
        return await _get(registry, uuid)

    entry = _with_registry(registry_url, op)
    if args.json:
        print(json.dumps(_public_record(entry, secret=args.secret), indent=2))
        return 0
    print(f"ID:       {entry.uuid}")
    print(f"label:    {_one_line(entry.label)}")
    print(f"step:     {entry.step} s")
    print(f"digits:   {entry.digits}")
    print(f"created:  {_local_time(entry.created)}")
    print(f"updated:  {_local_time(entry.updated)}")
    print(f"secret:   {entry.base32 if args.secret else '(hidden; pass --secret)'}")
    return 0


def _users_remove(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    registry_url = _registry_url(args, data_dir)
    uuid: str = args.id
    _prepare_data_dir(data_dir, registry_url, create=False)

    async def op(registry: Registry) -> None:
        await registry.remove(uuid)

    _with_registry(registry_url, op)
    print(f"removed hidden server {uuid} from {_redact(registry_url)}")
    return 0


# ---------------------------------------------------------------------------- cert


def _cert(args: argparse.Namespace) -> int:
    out_dir: Path = args.out_dir
    cert, key = out_dir / CERT_FILE, out_dir / KEY_FILE
    if not args.force:
        for path in (cert, key):
            if path.exists():
                raise ConfigError(f"{path} exists: pass --force to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    generate_self_signed(args.hosts, cert, key, days=args.days)
    print(f"certificate: {cert}")
    print(f"key:         {key} (mode 0600)")
    print(f"names:       {', '.join(cert_names(cert.read_bytes()))}")
    print(f"valid for:   {args.days} days")
    return 0


# ---------------------------------------------------------------------------- open, get
# The mobile side. Its modules are imported inside the handlers so the relay's own commands do
# not load httpx.

_OPEN_EPILOG = """\
examples:
  rendezvous open 2f402f80-da50-11e1-9b23-000000000001 \\
      --server relay.example.com:8899 --ca relay-cert.pem
      then: curl http://127.0.0.1:8080/status, or open the address in a browser
  rendezvous open ID --config hub.json --listen 127.0.0.1:9000 --auth digest

Each connection to the local address becomes one pairing with the hidden server. Its first
request gets the credentials that name ID (an Authorization header of its own is dropped);
later requests on the same connection reach the same hidden server unchanged. When the relay
cannot be reached the local client gets 502 with the reason; when no hidden server is parked,
the relay's 404 "UUID not registered".

exit status: 0 after Ctrl-C or SIGTERM; 2 when the command line is wrong or the local
address cannot be listened on."""

_GET_EPILOG = """\
examples:
  rendezvous get 2f402f80-da50-11e1-9b23-000000000001 /status \\
      --server relay.example.com:8899 --ca relay-cert.pem
  rendezvous get ID /upload --config hub.json -d @photo.jpg -H 'Content-Type: image/jpeg'
  rendezvous get ID /backup.tar --config hub.json -o backup.tar --timeout 600

exit status: 0 for a 1xx, 2xx or 3xx answer; 1 for an HTTP error status (the relay's own,
e.g. "404 UUID not registered", is printed to stderr); 2 when the relay cannot be reached
(connection, TLS, timeout) or the command line is wrong."""


def _host_port(
    default_host: str | None, default_port: int | None
) -> Callable[[str], tuple[str, int]]:
    """``HOST:PORT``, ``[IPv6]:PORT``, and HOST alone (``default_port``) or PORT alone
    (``default_host``) when those have defaults."""

    def parse(text: str) -> tuple[str, int]:
        text = text.strip()
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
            port_text = rest[1:]
        elif text.isdigit() and default_host is not None:
            host, port_text = default_host, text
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, ""  # a host name, or an IPv6 address without brackets
        if not host:
            if default_host is None:
                raise argparse.ArgumentTypeError(f"no host in {text!r}")
            host = default_host
        if not port_text:
            if default_port is None:
                raise argparse.ArgumentTypeError(f"no port in {text!r}")
            return host, default_port
        if not port_text.isdigit() or int(port_text) > 65535:
            raise argparse.ArgumentTypeError(f"not a port: {port_text!r}")
        return host, int(port_text)

    return parse


def _relay_options() -> argparse.ArgumentParser:
    """The hidden server's ID and how to reach the relay, shared by ``open`` and ``get``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("uuid", metavar="ID", help="the hidden server's ID")
    group = common.add_argument_group("relay")
    group.add_argument(
        "--server",
        type=_host_port(None, DEFAULT_PORT),
        metavar="HOST[:PORT]",
        help=f"the relay (port default: {DEFAULT_PORT}); required without --config",
    )
    group.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="PEM certificate to trust for the relay: its self-signed certificate or its CA "
        "(default: the system's trust store, or server.ca of --config)",
    )
    group.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a provisioning file (from 'rendezvous users add') to take the relay's host, "
        "port and certificate from; --server and --ca override it",
    )
    return common


def _add_open(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "open",
        parents=[_relay_options()],
        formatter_class=_Formatter,
        help="reach a hidden server from a local address, like ssh -L",
        description="Listen on a local address and send every connection made to it through\n"
        "the relay to hidden server ID, so any HTTP client or browser reaches it\n"
        "without credentials.",
        epilog=_OPEN_EPILOG,
    )
    p.add_argument(
        "--listen",
        type=_host_port("127.0.0.1", None),
        default=("127.0.0.1", 8080),
        metavar="[HOST:]PORT",
        help="local address to listen on; port 0 picks a free one (default: 127.0.0.1:8080)",
    )
    p.add_argument(
        "--auth",
        choices=("basic", "digest"),
        default="basic",
        help="how to name ID to the relay: Basic (one round trip) or Digest, answering the "
        "relay's challenge (default: %(default)s)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr as text or as JSON objects (default: %(default)s)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio event loop")
    p.set_defaults(handler=_mobile_open)


def _add_get(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "get",
        parents=[_relay_options()],
        formatter_class=_Formatter,
        help="fetch one URL from a hidden server, like curl",
        description="Send one request to hidden server ID through the relay and write the\n"
        "response body to stdout (or --output).",
        epilog=_GET_EPILOG,
    )
    p.add_argument("path", metavar="PATH", help="the path (and query) to fetch, e.g. /status")
    p.add_argument("-X", "--request", metavar="METHOD", help="method (default: GET, POST with -d)")
    p.add_argument(
        "-d",
        "--data",
        metavar="DATA",
        help="request body: text, @FILE for a file's bytes, @- for stdin",
    )
    p.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an extra request header; repeatable",
    )
    p.add_argument("-i", "--include", action="store_true", help="write the response head first")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the body to FILE")
    p.add_argument("-L", "--location", action="store_true", help="follow redirects")
    p.add_argument(
        "--timeout",
        type=_seconds(allow_zero=False),
        default=30.0,
        metavar="SECONDS",
        help="limit on connecting and on each wait for data (default: %(default)s)",
    )
    p.set_defaults(handler=_mobile_get)


def _relay_target(args: argparse.Namespace) -> tuple[str, tuple[str, int], str | None]:
    """The ID, the relay's address and the PEM to trust for it, from the flags and --config."""
    import ssl

    from rendezvous.provisioning import load_provisioning
    from rendezvous.tls import client_ssl_context

    uuid: str = args.uuid
    if not uuid or any(ord(c) < 0x21 or ord(c) == 0x7F for c in uuid):
        raise ConfigError(f"invalid ID {uuid!r}: no spaces or control characters")
    config: Path | None = args.config
    ca: Path | None = args.ca
    provisioning = load_provisioning(config) if config is not None else None
    server: tuple[str, int] | None = args.server
    if server is None and provisioning is not None:
        server = (provisioning.host, provisioning.port)
    if server is None:
        raise ConfigError("which relay? pass --server HOST:PORT (or --config FILE)")
    ca_pem = read_cert_pem(ca) if ca is not None else None
    if ca_pem is None and provisioning is not None:
        ca_pem = provisioning.ca_pem
    try:
        client_ssl_context(ca_pem)
    except ssl.SSLError as exc:
        raise ConfigError(f"unusable certificate for the relay: {exc.reason or exc}") from exc
    return uuid, server, ca_pem


def _mobile_open(args: argparse.Namespace) -> int:
    uuid, server, ca_pem = _relay_target(args)
    if args.auth == "basic" and ":" in uuid:
        raise ConfigError(f"ID {uuid!r} holds ':', which Basic credentials cannot carry: "
                          "pass --auth digest")
    from rendezvous import logs
    from rendezvous.agent.mobile import Tunnel, serve_until_signalled
    from rendezvous.server.app import loop_factory

    logs.configure_logging(args.log_format)
    tunnel = Tunnel(uuid, server, ca_pem=ca_pem, listen=args.listen, auth=args.auth)

    def ready(started: Tunnel) -> None:
        print(f"open {started.url} to reach {uuid} through {started.relay}", flush=True)

    host, port = args.listen
    try:
        with asyncio.Runner(loop_factory=loop_factory(not args.no_uvloop)) as runner:
            runner.run(serve_until_signalled(tunnel, ready))
    except OSError as exc:
        # errno's text, not asyncio's "error while attempting to bind on address (...)".
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or exc
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from exc
    return 0


def _request_body(data: str | None) -> bytes | None:
    if data is None:
        return None
    if data == "@-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {data[1:]}: {exc.strerror or exc}") from exc
    return data.encode("utf-8")


def _request_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or any(c in line for c in "\r\n"):
            raise ConfigError(f"not a header 'NAME: VALUE': {line!r}")
        headers.append((name.strip(), value.strip()))
    return headers


def _mobile_get(args: argparse.Namespace) -> int:
    uuid, server, ca_pem = _relay_target(args)
    body = _request_body(args.data)
    headers = _request_headers(args.header)
    method: str = (args.request or ("POST" if body is not None else "GET")).upper()
    path: str = args.path if args.path.startswith("/") else "/" + args.path
    import httpx

    from rendezvous.agent.mobile import client

    relay = f"[{server[0]}]:{server[1]}" if ":" in server[0] else f"{server[0]}:{server[1]}"
    try:
        with (
            client(uuid, server, ca_pem=ca_pem, timeout=args.timeout,
                   follow_redirects=args.location) as http,
            http.stream(method, path, headers=headers, content=body) as response,
        ):
            return _write_response(args, response)
    except httpx.TimeoutException:
        _err(f"error: no answer through relay {relay} within {args.timeout:g} s")
    except httpx.ConnectError as exc:
        reason = re.sub(r"^\[Errno -?\d+\] ", "", str(exc))
        hint = " (is --ca the relay's certificate?)" if "CERTIFICATE_VERIFY" in reason else ""
        _err(f"error: cannot reach relay {relay}: {reason}{hint}")
    except httpx.HTTPError as exc:
        _err(f"error: request through relay {relay} failed: {exc or type(exc).__name__}")
    return EXIT_ERROR


def _write_response(args: argparse.Namespace, response: Any) -> int:
    """Write the response as ``get`` promises; its exit status."""
    from rendezvous.agent.mobile import MAX_ERROR_BODY, relay_diagnostic

    status: int = response.status_code
    length = response.headers.get("content-length", "")
    if (status >= 400 and length.isdigit() and int(length) <= MAX_ERROR_BODY
            and response.headers.get("content-type", "").startswith("application/json")):
        diagnostic = relay_diagnostic(status, response.read())
        if diagnostic is not None:
            _err(f"error: {status} {diagnostic}")
            return 1
    output: Path | None = args.output
    with contextlib.ExitStack() as stack:
        if output is None:
            stream = sys.stdout.buffer
        else:
            try:
                stream = stack.enter_context(output.open("wb"))
            except OSError as exc:
                raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc
        if args.include:
            head = [f"{response.http_version} {status} {response.reason_phrase}\r\n".encode()]
            head += [name + b": " + value + b"\r\n" for name, value in response.headers.raw]
            stream.write(b"".join(head) + b"\r\n")
        for chunk in response.iter_bytes():
            stream.write(chunk)
        stream.flush()
    if status >= 400:
        _err(f"error: {status} {response.reason_phrase}")
        return 1
    return 0


# ---------------------------------------------------------------------------- hidden
# The hidden-server agent (rendezvous/agent/hidden.py). Its defaults are repeated here rather
# than imported, so building the parser does not load the agent package; tests check they agree.

_HIDDEN_POOL = 4
_HIDDEN_MAX_PARK_AGE = 300.0
_HIDDEN_BACKOFF_CAP = 30.0
_HIDDEN_AUTH_RETRY = 60.0
_HIDDEN_STATUS_INTERVAL = 60.0
_HIDDEN_GRACE = 10.0

_HIDDEN_EPILOG = """\
example:
  rendezvous hidden --config hub.json --forward 127.0.0.1:8080
      then, from anywhere: curl --digest -u ID:x --cacert relay-cert.pem https://RELAY:8899/

The agent keeps --pool connections parked at the relay and parks a new one the moment one is
paired. After a failure it retries with exponential back-off (up to --backoff-cap); when the
relay refuses its credentials (401: wrong secret, entry removed, clock off) it says so once
and retries every --auth-retry seconds. One log line per event on stderr, and a status line
every --status-interval seconds.

exit status: 0 after SIGINT or SIGTERM (active pairings get --grace seconds to finish; a
second signal cuts them); 2 for a missing or malformed provisioning file or a bad option."""


def _add_hidden(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "hidden",
        formatter_class=_Formatter,
        help="run a hidden server's agent: park at the relay, forward pairings to a local port",
        description="Run the agent of a hidden server: keep connections parked at the relay\n"
        "named in its provisioning file (from 'rendezvous users add') and forward each\n"
        "mobile client paired with one to a local TCP service, e.g. an HTTP server on\n"
        "this machine. The local service needs no open port to the outside.",
        epilog=_HIDDEN_EPILOG,
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        required=True,
        help="the hidden server's provisioning file (ID, secret, relay, certificate)",
    )
    p.add_argument(
        "--forward",
        metavar="HOST:PORT",
        required=True,
        help="the local service each pairing is forwarded to (PORT alone: 127.0.0.1:PORT)",
    )
    p.add_argument(
        "--server",
        metavar="HOST[:PORT]",
        action="append",
        help=f"reach the relay here instead of at the provisioning file's address (port "
        f"default: {DEFAULT_PORT}); repeat it for the nodes of a cluster: after a network "
        "failure the agent tries the next",
    )
    p.add_argument(
        "--pool",
        type=_int_in(1, 1000),
        default=_HIDDEN_POOL,
        metavar="N",
        help="connections kept parked, i.e. mobile clients served at once without waiting "
        "(default: %(default)s)",
    )
    timing = p.add_argument_group("timing")
    timing.add_argument(
        "--max-park-age",
        type=_seconds(allow_zero=False),
        default=_HIDDEN_MAX_PARK_AGE,
        metavar="SECONDS",
        help="replace a parked connection older than this, so none is silently dead "
        "(default: %(default)s)",
    )
    timing.add_argument(
        "--backoff-cap",
        type=_seconds(allow_zero=False),
        default=_HIDDEN_BACKOFF_CAP,
        metavar="SECONDS",
        help="longest wait between attempts when the relay is unreachable "
        "(default: %(default)s)",
    )
    timing.add_argument(
        "--auth-retry",
        type=_seconds(allow_zero=False),
        default=_HIDDEN_AUTH_RETRY,
        metavar="SECONDS",
        help="wait between attempts while the relay refuses our credentials "
        "(default: %(default)s)",
    )
    timing.add_argument(
        "--status-interval",
        type=_seconds(allow_zero=False),
        default=_HIDDEN_STATUS_INTERVAL,
        metavar="SECONDS",
        help="period of the status log line (default: %(default)s)",
    )
    timing.add_argument(
        "--grace",
        type=_seconds(allow_zero=True),
        default=_HIDDEN_GRACE,
        metavar="SECONDS",
        help="time active pairings get to finish after SIGINT/SIGTERM (default: %(default)s)",
    )
    run = p.add_argument_group("runtime")
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr as text or as JSON objects (default: %(default)s)",
    )
    run.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio event loop")
    p.set_defaults(handler=_hidden)


def _cluster_config(args: argparse.Namespace) -> ClusterConfig | None:
    """The cluster settings of ``serve``, or None without --cluster."""
    if args.cluster is None:
        return None
    if not args.cluster_key:
        raise ConfigError(f"--cluster needs --cluster-key or ${ENV_CLUSTER_KEY}: the nodes' "
                          "shared secret (at least 16 characters)")
    if len(args.cluster_key) < 16:
        raise ConfigError("the cluster key must be at least 16 characters")
    host, port = _address(args.internal, "--internal", _host_port("127.0.0.1", None))
    advertise = args.advertise
    if advertise is None and host in ("0.0.0.0", "::", ""):
        raise ConfigError("--internal binds every interface: say which address other nodes "
                          "dial with --advertise HOST:PORT")
    if advertise is not None:
        advertise = "{}:{}".format(*_address(advertise, "--advertise", _host_port(None, None)))
    return ClusterConfig(redis_url=args.cluster, node_id=args.node_id or socket.gethostname(),
                         internal_host=host, internal_port=port, cluster_key=args.cluster_key,
                         advertise=advertise, ttl=args.cluster_ttl)


def _address(text: str, flag: str, parse: Callable[[str], tuple[str, int]]) -> tuple[str, int]:
    """``parse(text)``, its complaint turned into a one-line error naming ``flag``."""
    try:
        host, port = parse(text)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{flag} must be HOST:PORT, e.g. 127.0.0.1:8080 ({exc})") from None
    if port == 0:
        raise ConfigError(f"{flag} must be HOST:PORT with a port from 1 to 65535, not {text!r}")
    return host, port


def _hidden(args: argparse.Namespace) -> int:
    forward = _address(args.forward, "--forward", _host_port("127.0.0.1", None))
    server = ([_address(text, "--server", _host_port(None, DEFAULT_PORT)) for text in args.server]
              if args.server else None)
    from rendezvous import logs
    from rendezvous.agent.hidden import HiddenAgent, forward_to, serve_until_signalled
    from rendezvous.provisioning import load_provisioning
    from rendezvous.server.app import loop_factory

    provisioning = load_provisioning(args.config)
    agent = HiddenAgent(
        provisioning,
        handler=forward_to(*forward),
        pool=args.pool,
        server=server,
        max_park_age=args.max_park_age,
        backoff_cap=args.backoff_cap,
        auth_retry=args.auth_retry,
        status_interval=args.status_interval,
        grace=args.grace,
    )
    logs.configure_logging(args.log_format)
    with asyncio.Runner(loop_factory=loop_factory(not args.no_uvloop)) as runner:
        runner.run(serve_until_signalled(agent))
    return 0


# ---------------------------------------------------------------------------- admin


def _admin_password_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--admin-password",
        metavar="PASSWORD",
        help=f"password of the admin page (default: ${ENV_ADMIN_PASSWORD}; the variable keeps it "
        "out of the process list). Required to listen on anything but loopback; with it, "
        "every page asks to log in",
    )


def _admin_page_options(p: argparse.ArgumentParser) -> None:
    """``serve --admin`` and its settings."""
    group = p.add_argument_group(
        "admin page",
        "The admin page lists, adds, rotates and removes hidden servers and shows the\n"
        "relay's live numbers; it also serves /metrics (Prometheus), /healthz and /readyz.",
    )
    group.add_argument(
        "--admin",
        nargs="?",
        const=(DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT),
        type=_host_port(DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT),
        metavar="HOST:PORT",
        help=f"serve the admin page here, in the relay's process (with no value: "
        f"{DEFAULT_ADMIN_HOST}:{DEFAULT_ADMIN_PORT})",
    )
    _admin_password_option(group)
    group.add_argument(
        "--metrics-per-id",
        action="store_true",
        help="add a parked-connections series per hidden-server ID to /metrics",
    )
    group.add_argument(
        "--server-host",
        metavar="HOST",
        help="relay host written into provisioning files made on the page (default: the first "
        "public name in the relay's certificate, else this machine's FQDN)",
    )
    group.add_argument(
        "--server-port",
        type=_int_in(1, 65535),
        metavar="PORT",
        help="relay port written into those files (default: the port the relay listens on)",
    )


def _admin_password(args: argparse.Namespace) -> str | None:
    given: str | None = args.admin_password
    if given is not None:
        return given
    return os.environ.get(ENV_ADMIN_PASSWORD) or None


def _serve_admin(args: argparse.Namespace) -> AdminConfig | None:
    """The admin page's settings for ``serve`` (None without --admin); raises ConfigError for a
    page that would be open to the network."""
    address: tuple[str, int] | None = args.admin
    if address is None:
        return None
    host, port = address
    return AdminConfig(
        host=host, port=port, password=_admin_password(args), metrics_per_id=args.metrics_per_id
    )


def _serve_relay_address(
    args: argparse.Namespace, data_dir: Path, tls: TLSConfig | None
) -> RelayAddress:
    """What the page's provisioning files say about this relay."""
    cert_file = tls.cert_file if tls is not None else data_dir / CERT_FILE
    host: str = args.server_host or default_server_host(cert_file)
    ca = self_signed_pem(tls.cert_file) if tls is not None else None
    return RelayAddress(host=host, port=args.server_port, ca_pem=ca)


def _add_admin(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "admin",
        parents=[_registry_options()],
        formatter_class=_Formatter,
        help="serve the admin page alone: manage hidden servers from a browser",
        description="Serve the admin page over the registry, without a relay (like\n"
        "node-rendezvous's registrar): list, add, rotate and remove hidden servers, and hand\n"
        "out their provisioning files. For live relay numbers use 'serve --admin' instead.",
    )
    p.add_argument(
        "--listen",
        type=_host_port(DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT),
        default=(DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT),
        metavar="HOST:PORT",
        help=f"address of the page (default: {DEFAULT_ADMIN_HOST}:{DEFAULT_ADMIN_PORT})",
    )
    _admin_password_option(p)
    group = p.add_argument_group("provisioning files")
    group.add_argument(
        "--server-host",
        metavar="HOST",
        help="relay host hidden servers connect to (default: the first public name in "
        "DIR/cert.pem, else this machine's FQDN)",
    )
    group.add_argument(
        "--server-port",
        type=_int_in(1, 65535),
        default=DEFAULT_PORT,
        metavar="PORT",
        help="relay port hidden servers connect to (default: %(default)s)",
    )
    ca = group.add_mutually_exclusive_group()
    ca.add_argument(
        "--ca",
        metavar="FILE",
        type=Path,
        help="PEM certificate hidden servers must trust for the relay (default: DIR/cert.pem "
        "if it exists and is self-signed, else none)",
    )
    ca.add_argument(
        "--no-ca", action="store_true", help="no certificate: the relay's chains to a public CA"
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as JSON objects (default: %(default)s)",
    )
    p.set_defaults(handler=_admin)


def _admin(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    registry_url = _registry_url(args, data_dir)
    host, port = args.listen
    # Built first: a page that would be open to the network is refused before anything happens.
    access = AdminConfig(host=host, port=port, password=_admin_password(args))
    _prepare_data_dir(data_dir, registry_url, create=True)
    ca, ca_source = relay_ca(data_dir, args.ca, no_ca=args.no_ca)
    relay = RelayAddress(
        host=args.server_host or default_server_host(data_dir / CERT_FILE),
        port=args.server_port,
        ca_pem=ca,
    )
    _err(f"registry: {_redact(registry_url)}")
    _err(f"provisioning files: server {relay.host}:{relay.port}, CA {ca_source}")

    # Imported here so the other commands start without loading aiohttp.
    from rendezvous.admin import run

    return run(replace(access, relay=relay), registry_url, args.log_format)
