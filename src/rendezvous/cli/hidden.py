"""``rendezvous hidden``: run a hidden server's agent (park at the relay, forward pairings)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rendezvous.cli.options import (
    Commands,
    Formatter,
    address,
    host_port,
    int_in,
    relay_host_port,
    runtime_options,
    seconds,
)
from rendezvous.config import (
    DEFAULT_AGENT_POOL,
    DEFAULT_AUTH_RETRY,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_GRACE,
    DEFAULT_MAX_PARK_AGE,
    DEFAULT_PORT,
    DEFAULT_STATUS_INTERVAL,
    HiddenAgentConfig,
)
from rendezvous.registry.base import PROXY_VERSIONS

_EPILOG = """\
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


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Add ``hidden`` to ``commands``."""
    p = commands.add_parser(
        "hidden",
        parents=[runtime_options()],
        formatter_class=Formatter,
        help="run a hidden server's agent: park at the relay, forward pairings to a local port",
        description="Run the agent of a hidden server: keep connections parked at the relay\n"
        "named in its provisioning file (from 'rendezvous users add') and forward each\n"
        "mobile client paired with one to a local TCP service, e.g. an HTTP server on\n"
        "this machine. The local service needs no open port to the outside.",
        epilog=_EPILOG,
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
        "--proxy-protocol",
        type=int,
        choices=PROXY_VERSIONS,
        metavar="0|1|2",
        help="the local service speaks the PROXY protocol: ask the relay to start each pairing "
        "with a PROXY header of this version naming the visitor; 0 for none (default: the "
        "provisioning file's proxyProtocol, from 'users add --proxy-protocol'; else none)",
    )
    p.add_argument(
        "--pool",
        type=int_in(1, 1000),
        default=DEFAULT_AGENT_POOL,
        metavar="N",
        help="connections kept parked, i.e. mobile clients served at once without waiting "
        "(default: %(default)s)",
    )
    timing = p.add_argument_group("timing")
    timing.add_argument(
        "--max-park-age",
        type=seconds(allow_zero=False),
        default=DEFAULT_MAX_PARK_AGE,
        metavar="SECONDS",
        help="replace a parked connection older than this, so none is silently dead "
        "(default: %(default)s)",
    )
    timing.add_argument(
        "--backoff-cap",
        type=seconds(allow_zero=False),
        default=DEFAULT_BACKOFF_CAP,
        metavar="SECONDS",
        help="longest wait between attempts when the relay is unreachable "
        "(default: %(default)s)",
    )
    timing.add_argument(
        "--auth-retry",
        type=seconds(allow_zero=False),
        default=DEFAULT_AUTH_RETRY,
        metavar="SECONDS",
        help="wait between attempts while the relay refuses our credentials "
        "(default: %(default)s)",
    )
    timing.add_argument(
        "--status-interval",
        type=seconds(allow_zero=False),
        default=DEFAULT_STATUS_INTERVAL,
        metavar="SECONDS",
        help="period of the status log line (default: %(default)s)",
    )
    timing.add_argument(
        "--grace",
        type=seconds(allow_zero=True),
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="time active pairings get to finish after SIGINT/SIGTERM (default: %(default)s)",
    )
    p.set_defaults(handler=_hidden)


def agent_config(args: argparse.Namespace) -> HiddenAgentConfig:
    """The agent's settings from the command line; ConfigError for a bad address."""
    forward = address(args.forward, "--forward", host_port("127.0.0.1", None))
    servers = tuple(address(text, "--server", relay_host_port()) for text in args.server or ())
    return HiddenAgentConfig(
        provisioning_file=args.config, forward=forward, servers=servers, pool=args.pool,
        max_park_age=args.max_park_age, backoff_cap=args.backoff_cap,
        auth_retry=args.auth_retry, status_interval=args.status_interval, grace=args.grace,
        log_format=args.log_format, use_uvloop=not args.no_uvloop,
        proxy_protocol=args.proxy_protocol,
    )


def _hidden(args: argparse.Namespace) -> int:
    config = agent_config(args)
    from rendezvous import logs, runtime
    from rendezvous.agent.hidden import HiddenAgent, forward_to, serve_until_signalled
    from rendezvous.provisioning import load_provisioning

    provisioning = load_provisioning(config.provisioning_file)
    agent = HiddenAgent(
        provisioning,
        handler=forward_to(*config.forward),
        pool=config.pool,
        server=list(config.servers) or None,
        max_park_age=config.max_park_age,
        backoff_cap=config.backoff_cap,
        auth_retry=config.auth_retry,
        status_interval=config.status_interval,
        grace=config.grace,
        proxy_protocol=config.proxy_protocol,
    )
    logs.configure_logging(config.log_format)
    # SIGHUP reads the file again (a rotated secret): see HiddenAgent.reload.
    runtime.run(serve_until_signalled(
        agent, reload=lambda: load_provisioning(config.provisioning_file)),
        use_uvloop=config.use_uvloop)
    return 0
