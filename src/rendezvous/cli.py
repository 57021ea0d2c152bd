"""The ``rendezvous`` command: parses arguments into config and calls the parts, nothing else.

    rendezvous serve                 run the relay
    rendezvous users add|list|show|rotate|remove
                                     manage hidden servers in the registry
    rendezvous cert                  make a self-signed certificate

Every error this package raises on purpose prints one line, ``rendezvous: error: ...``, and
exits with status 2 — the status argparse uses for a bad command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from uuid import uuid4

from rendezvous import __version__
from rendezvous.config import (
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
    PER_ADDRESS_BURST,
    PER_ADDRESS_INTERVAL,
    PER_ID_BURST,
    PER_ID_INTERVAL,
    GuessLimits,
    Limits,
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
from rendezvous.provisioning import (
    MAX_DIGITS,
    MIN_DIGITS,
    provisioning_document,
    write_provisioning,
)
from rendezvous.registry import Entry, Registry, new_secret, open_registry
from rendezvous.registry.base import DEFAULT_DIGITS, DEFAULT_STEP
from rendezvous.tls import (
    CERT_FILE,
    DEFAULT_DAYS,
    KEY_FILE,
    cert_names,
    default_names,
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
    _add_cert(commands)
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
    run = p.add_argument_group("runtime")
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as JSON objects (default: %(default)s)",
    )
    run.add_argument("--no-uvloop", action="store_true", help="use the standard asyncio event loop")
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


def _default_server_host(data_dir: Path) -> str:
    """The first name in DIR/cert.pem that ``ensure_self_signed`` did not add by itself.

    Those are the --public-host names given to ``serve``, the ones clients use; without any,
    this machine's fully qualified name.
    """
    cert = data_dir / CERT_FILE
    automatic = {name.lower() for name in default_names()}
    with contextlib.suppress(OSError, RendezvousError):
        for name in cert_names(cert.read_bytes()):
            if name.lower() not in automatic:
                return name
    return socket.getfqdn()


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ca_pem(args: argparse.Namespace, data_dir: Path) -> tuple[str | None, str]:
    """The PEM for ``server.ca`` and a few words on where it came from."""
    ca: Path | None = args.ca
    if args.no_ca:
        return None, "none"
    if ca is not None:
        return read_cert_pem(ca), str(ca)
    own = data_dir / CERT_FILE
    if own.is_file() and is_self_signed(own.read_bytes()):
        return read_cert_pem(own), f"{own} (self-signed)"
    return None, "none (the relay's certificate must chain to a public CA)"


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
    host: str = args.server_host or _default_server_host(data_dir)
    port: int = args.server_port
    ca, ca_source = _ca_pem(args, data_dir)
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
        uuid=uuid, base32=new_secret(), step=args.step, digits=args.digits, label=args.label
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
