"""Argument types and the option groups several commands share, each written once."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rendezvous.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_PORT,
    ENV_DATA_DIR,
    ENV_REGISTRY,
    Store,
)
from rendezvous.errors import ConfigError

PROG = "rendezvous"
EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], int]
Commands = argparse._SubParsersAction  # the ``add_subparsers`` object each group adds to


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps our hand-wrapped descriptions and gives option names room."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def err(message: str) -> None:
    """``rendezvous: MESSAGE`` on stderr: warnings and notes beside a command's output."""
    print(f"{PROG}: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- argument types


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer from ``low`` to ``high`` (no upper bound when None)."""

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


def seconds(*, allow_zero: bool) -> Callable[[str], float]:
    """A finite number of seconds, more than 0 (or 0 too with ``allow_zero``)."""

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


def host_port(
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


def address(text: str, flag: str, parse: Callable[[str], tuple[str, int]]) -> tuple[str, int]:
    """``parse(text)``, its complaint turned into a one-line error naming ``flag``."""
    try:
        host, port = parse(text)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{flag} must be HOST:PORT, e.g. 127.0.0.1:8080 ({exc})") from None
    if port == 0:
        raise ConfigError(f"{flag} must be HOST:PORT with a port from 1 to 65535, not {text!r}")
    return host, port


def relay_host_port() -> Callable[[str], tuple[str, int]]:
    """A relay's ``HOST[:PORT]`` (port default DEFAULT_PORT)."""
    return host_port(None, DEFAULT_PORT)


# ---------------------------------------------------------------------------- option groups


def store_options() -> argparse.ArgumentParser:
    """--data-dir and --registry: every command that reads the data folder or the registry."""
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


def store(args: argparse.Namespace) -> Store:
    """The data folder and registry of ``store_options``: flag, else environment, else default."""
    given_dir: Path | None = args.data_dir
    data_dir = given_dir or Path(os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR)
    given_url: str | None = args.registry
    return Store(data_dir, given_url or os.environ.get(ENV_REGISTRY) or "")


LOG_LEVELS = ("debug", "info", "warning", "error")


def runtime_options(*, uvloop: bool = True, log_level: bool = False) -> argparse.ArgumentParser:
    """--log-format (and --no-uvloop, --log-level): every command that runs until it is
    stopped."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("runtime")
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr as text or as JSON objects (default: %(default)s)",
    )
    if log_level:
        group.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            default="info",
            help="least important log lines written (default: %(default)s)",
        )
    if uvloop:
        group.add_argument("--no-uvloop", action="store_true",
                           help="use the standard asyncio event loop")
    return common


def provisioning_options(*, files: bool = True) -> argparse.ArgumentParser:
    """What a provisioning file says about the relay (``users add``/``rotate``, ``admin``);
    with ``files``, also where it goes."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("provisioning file")
    # users add/rotate record a given address in the entry (registrar.public_address).
    kept = "; the entry keeps it for its later files" if files else ""
    group.add_argument(
        "--server-host",
        metavar="HOST",
        help="relay host hidden servers connect to: its public name (default: the relay's, as "
        "'serve' recorded it in DIR/relay.json; before its first start the first public name "
        f"in DIR/cert.pem, else this machine's FQDN){kept}",
    )
    group.add_argument(
        "--server-port",
        type=int_in(1, 65535),
        metavar="PORT",
        help=f"relay port hidden servers connect to (default: the relay's, from DIR/relay.json; "
        f"before its first start {DEFAULT_PORT}){kept}",
    )
    ca = group.add_mutually_exclusive_group()
    ca.add_argument(
        "--ca",
        metavar="FILE",
        type=Path,
        help="PEM certificate hidden servers must trust for the relay (default: the relay's "
        "certificate if it is self-signed, else none)",
    )
    ca.add_argument(
        "--no-ca",
        action="store_true",
        help="put no certificate in the file: the relay's chains to a public CA",
    )
    if files:
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
