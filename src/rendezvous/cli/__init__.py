"""The ``rendezvous`` command: parses arguments into config and calls the parts, nothing else.

    rendezvous serve                 run the relay
    rendezvous config show|init      serve's settings (relay.toml): effective, or a new file
    rendezvous status                what the running relay holds: parked and active per ID
    rendezvous users add|list|show|rotate|visitor|remove
                                     manage hidden servers in the registry
    rendezvous cert                  make a self-signed certificate
    rendezvous admin                 serve the admin page alone (manage hidden servers)
    rendezvous open ID               reach a hidden server from a local address (like ssh -L)
    rendezvous get ID PATH           fetch one URL from a hidden server (like curl)
    rendezvous hidden                run a hidden server's agent: park at the relay, forward
                                     each pairing to a local service

One module per command group; ``options`` holds the argument types and the option groups they
share. What the commands do lives outside this package (``registrar``: the data folder, the
registry, provisioning; ``server``, ``admin``, ``agent``).

Every error this package raises on purpose prints one line, ``rendezvous: error: ...``, and
exits with status 2 — the status argparse uses for a bad command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from rendezvous import __version__
from rendezvous.cli import admin, certs, configcmd, hidden, mobile, serve, status, users
from rendezvous.cli.options import EXIT_ERROR, PROG, Formatter, Handler
from rendezvous.errors import RendezvousError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command and its options."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=Formatter,
        description="A rendezvous relay: reach HTTP servers hidden behind NAT through a public\n"
        "TLS relay, compatible with node-rendezvous.",
        epilog="Run 'rendezvous COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_commands(commands)
    configcmd.add_commands(commands)
    status.add_commands(commands)
    users.add_commands(commands)
    admin.add_commands(commands)
    certs.add_commands(commands)
    mobile.add_commands(commands)
    hidden.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``rendezvous`` command with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for relay.toml's precedence: which options the command line gave
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
