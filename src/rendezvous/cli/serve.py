"""``rendezvous serve``: run the relay (and, with --admin, the admin page beside it)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import socket
from dataclasses import replace
from pathlib import Path

from rendezvous import registrar
from rendezvous.cli import settings
from rendezvous.cli.admin import admin_access, admin_password_option
from rendezvous.cli.options import (
    PROG,
    Commands,
    Formatter,
    address,
    err,
    host_port,
    int_in,
    runtime_options,
    seconds,
    store,
    store_options,
)
from rendezvous.config import (
    DEFAULT_ACME_HTTP_MAX_CONNECTIONS,
    DEFAULT_ACME_HTTP_MAX_HEAD,
    DEFAULT_ACME_HTTP_TIMEOUT,
    DEFAULT_ACME_LOCK_TTL,
    DEFAULT_ACME_ORDERS_PER_HOUR,
    DEFAULT_ADMIN_HOST,
    DEFAULT_ADMIN_PORT,
    DEFAULT_CLUSTER_LINK_TIMEOUT,
    DEFAULT_CLUSTER_ROUTES,
    DEFAULT_CLUSTER_TTL,
    DEFAULT_CLUSTER_WINDOW,
    DEFAULT_ENTRY_CACHE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MALLOC_TRIM_INTERVAL,
    DEFAULT_MAX_CLIENT_HELLO,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEAD_SIZE,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_PAIR_IDLE_TIMEOUT,
    DEFAULT_PAIR_WAIT,
    DEFAULT_PARKED_TIMEOUT,
    DEFAULT_POOL_SIZE,
    DEFAULT_PORT,
    DEFAULT_REGISTRY_POLL,
    DEFAULT_SETTLE,
    DEFAULT_VISITOR_FAILURES_PER_CONNECTION,
    ENV_CLUSTER_KEY,
    HTTP_01,
    LETS_ENCRYPT_DIRECTORY,
    PER_ADDRESS_BURST,
    PER_ADDRESS_INTERVAL,
    PER_ID_BURST,
    PER_ID_INTERVAL,
    TLS_ALPN_01,
    AcmeConfig,
    AcmeHttpConfig,
    AdminConfig,
    ClusterConfig,
    GuessLimits,
    IPNetwork,
    Limits,
    RelayAddress,
    ServerConfig,
    Store,
    TLSConfig,
    parse_networks,
)
from rendezvous.errors import ConfigError, RendezvousError
from rendezvous.protocol.hostnames import normal_domain
from rendezvous.protocol.ids import valid_name
from rendezvous.tls import cert_names, ensure_self_signed, is_self_signed, server_ssl_context


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to ``commands``."""
    p = commands.add_parser(
        "serve",
        parents=[store_options(), runtime_options(log_level=True)],
        formatter_class=Formatter,
        help="run the relay",
        description="Run the relay. Without --cert or --no-tls it uses DIR/cert.pem and\n"
        "DIR/key.pem, creating a self-signed pair on first run; provisioning files made\n"
        "by 'rendezvous users add' carry that certificate for hidden servers to trust.\n"
        "At start it records its public address in DIR/relay.json, and the files made\n"
        "later by 'users add', 'users rotate' and the admin page point there.\n"
        "Every option is also a key of DIR/relay.toml (or --config FILE) and a\n"
        "RENDEZVOUS_<KEY> variable: flag > variable > file > default ('config show').",
    )
    add_options(p)
    p.set_defaults(handler=_serve, parser=p)


def add_options(p: argparse.ArgumentParser) -> None:
    """Every option of ``serve`` but those of the shared groups (``config show`` has them too)."""
    config_option(p)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument(
        "--port",
        type=int_in(0, 65535),
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
        help="name or address clients use to reach the relay; repeatable. The first is the "
        "host provisioning files give; all are added to the self-signed certificate when it "
        "is created (not with --cert or --no-tls)",
    )
    tls.add_argument(
        "--domain",
        metavar="DOMAIN",
        help="serve named hidden servers: https://NAME.DOMAIN/ reaches the entry named NAME "
        "('users add --name'), with no credentials; needs a wildcard DNS record *.DOMAIN "
        "pointing here and a certificate for *.DOMAIN (--cert), or --acme, which orders one "
        "per name (default: none)",
    )
    tls.add_argument(
        "--proxy-protocol-from",
        type=_networks,
        default=(),
        metavar="CIDR[,CIDR]",
        help="load balancers whose connections start with a PROXY protocol header (haproxy's "
        "send-proxy or send-proxy-v2) naming the real client, which limits and logs then use; "
        "from any other address such a header is refused (default: none)",
    )
    tls.add_argument(
        "--forwarded",
        action="store_true",
        help="add 'Forwarded: for=CLIENT;proto=https' (RFC 7239) to every request head passed "
        "to a hidden server (default: off, heads pass unchanged)",
    )
    tls.add_argument(
        "--no-tls",
        action="store_true",
        help="speak plain TCP, for a relay behind a TLS-terminating balancer",
    )
    acme = p.add_argument_group(
        "ACME",
        "A trusted certificate for every --public-host name from an ACME CA (Let's Encrypt by\n"
        "default), validated by TLS-ALPN-01 on this listener (the CA connects to port 443),\n"
        "or by HTTP-01 on the --acme-http listener (port 80), and renewed at two thirds of\n"
        "its lifetime; kept in DIR/acme/ (with --cluster: in the cluster's Redis, one node\n"
        "ordering at a time, every node serving the result). With --domain D, also one\n"
        "certificate per named entry (NAME.D), ordered when the name is created (never for a\n"
        "name no entry has) and dropped when it goes; or give a wildcard certificate for *.D\n"
        "with --cert/--key, which named hosts then get (none is ordered).")
    acme.add_argument("--acme", action="store_true",
                      help="order and renew the certificate from an ACME CA")
    acme.add_argument("--acme-email", metavar="ADDRESS",
                      help="contact address of the ACME account (expiry warnings go there)")
    acme.add_argument("--acme-directory", metavar="URL", default=LETS_ENCRYPT_DIRECTORY,
                      help="the CA's directory URL (default: Let's Encrypt's production one)")
    acme.add_argument("--acme-ca-bundle", metavar="FILE", type=Path,
                      help="trust this CA file when talking to the directory (a private CA)")
    acme.add_argument("--acme-orders-per-hour", metavar="N", type=int_in(1),
                      default=DEFAULT_ACME_ORDERS_PER_HOUR,
                      help="orders (new names, renewals) per hour at most, for the whole "
                      "cluster; names past it wait their turn (default: %(default)s; Let's "
                      "Encrypt allows 300 per 3 hours)")
    acme.add_argument("--acme-lock-ttl", metavar="SECONDS", type=seconds(allow_zero=False),
                      default=DEFAULT_ACME_LOCK_TTL,
                      help="with --cluster: how long the order lock of a node that died "
                      "mid-order blocks the others (default: %(default)s)")
    acme.add_argument(
        "--acme-http", metavar="PORT", type=int_in(0, 65535),
        help="also listen for plain HTTP on PORT (80 for a public CA): answer the CA's HTTP-01 "
        "validation there (orders then use http-01, for a relay whose 443 sits behind "
        "something) and redirect every other request with 308 to https:// on a --public-host "
        "name or NAME.DOMAIN (default: no such listener; tls-alpn-01)")
    acme.add_argument("--acme-http-host", metavar="ADDRESS",
                      help="address of the --acme-http listener (default: --host)")
    acme.add_argument("--acme-http-timeout", metavar="SECONDS", type=seconds(allow_zero=False),
                      default=DEFAULT_ACME_HTTP_TIMEOUT,
                      help="seconds from accept to a whole request head on the --acme-http "
                      "listener (default: %(default)s)")
    acme.add_argument("--acme-http-max-head-size", metavar="BYTES", type=int_in(1),
                      default=DEFAULT_ACME_HTTP_MAX_HEAD,
                      help="largest request head there; beyond it 431 (default: %(default)s)")
    acme.add_argument("--acme-http-max-connections", metavar="N", type=int_in(1),
                      default=DEFAULT_ACME_HTTP_MAX_CONNECTIONS,
                      help="connections open at once there; past it a new one gets 503 "
                      "(default: %(default)s)")
    public = p.add_argument_group(
        "public address",
        "What provisioning files tell hidden servers (recorded in DIR/relay.json at start).",
    )
    public.add_argument(
        "--server-host",
        metavar="HOST",
        help="relay host written into provisioning files (default: the first --public-host, "
        "else the first public name in the relay's certificate, else this machine's FQDN)",
    )
    public.add_argument(
        "--server-port",
        type=int_in(1, 65535),
        metavar="PORT",
        help="relay port written into those files, e.g. a balancer's (default: the port the "
        "relay listens on)",
    )
    _add_limits(p)
    _add_cluster(p)
    _add_admin_page(p)


def config_option(p: argparse.ArgumentParser) -> None:
    """--config FILE: where serve's settings are read (not a key itself)."""
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"settings file (TOML; default: ${settings.ENV_CONFIG}, else DIR/"
        f"{settings.CONFIG_FILE} when it exists)",
    )


def _add_limits(p: argparse.ArgumentParser) -> None:
    limits = p.add_argument_group("limits")
    limits.add_argument(
        "--pool-size",
        type=int_in(1),
        default=DEFAULT_POOL_SIZE,
        metavar="N",
        help="parked connections kept per hidden server; 1 behaves like node-rendezvous "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--pair-wait",
        type=seconds(allow_zero=True),
        default=DEFAULT_PAIR_WAIT,
        metavar="SECONDS",
        help="how long a client waits for a parked connection before 404 (default: %(default)s)",
    )
    limits.add_argument(
        "--settle",
        type=seconds(allow_zero=True),
        default=DEFAULT_SETTLE,
        metavar="SECONDS",
        help="how long a freshly parked connection rests before it is paired "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--head-timeout",
        type=seconds(allow_zero=False),
        default=DEFAULT_HEAD_TIMEOUT,
        metavar="SECONDS",
        help="time from accept to a complete request head, TLS handshake included "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--handshake-timeout",
        type=seconds(allow_zero=False),
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="time to finish the TLS handshake, within the head timeout (default: %(default)s)",
    )
    limits.add_argument(
        "--max-head-size",
        type=int_in(1),
        default=DEFAULT_MAX_HEAD_SIZE,
        metavar="BYTES",
        help="largest request head; beyond it 431 (default: %(default)s)",
    )
    limits.add_argument(
        "--max-client-hello",
        type=int_in(1),
        default=DEFAULT_MAX_CLIENT_HELLO,
        metavar="BYTES",
        help="largest TLS ClientHello read before the handshake while an ACME TLS-ALPN-01 "
        "challenge is pending; a longer one gets the normal certificate (default: %(default)s)",
    )
    limits.add_argument(
        "--max-headers",
        type=int_in(1),
        default=DEFAULT_MAX_HEADERS,
        metavar="N",
        help="most header lines in a request head; beyond it 431 (default: %(default)s)",
    )
    limits.add_argument(
        "--max-connections",
        type=int_in(1),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="most open client connections (default: %(default)s)",
    )
    limits.add_argument(
        "--max-per-address",
        type=int_in(1),
        default=DEFAULT_MAX_PER_ADDRESS,
        metavar="N",
        help="most open connections from one IP address (default: %(default)s)",
    )
    limits.add_argument(
        "--parked-timeout",
        type=seconds(allow_zero=False),
        default=DEFAULT_PARKED_TIMEOUT,
        metavar="SECONDS",
        help="close a connection parked unpaired this long (default: %(default)s)",
    )
    limits.add_argument(
        "--pair-idle-timeout",
        type=seconds(allow_zero=True),
        default=DEFAULT_PAIR_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a pairing with no byte either way this long; 0: never "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--registry-poll",
        type=seconds(allow_zero=False),
        default=DEFAULT_REGISTRY_POLL,
        metavar="SECONDS",
        help="how often to look for registry changes made by other processes, such as "
        "`users rotate`; parked connections they revoke are closed (default: %(default)s)",
    )
    limits.add_argument(
        "--entry-cache",
        type=int_in(0),
        default=DEFAULT_ENTRY_CACHE,
        metavar="N",
        help="registry entries kept in memory while the registry's changes are followed, so a "
        "known ID's CONNECT reads no registry; 0: read every time (default: %(default)s)",
    )
    process = p.add_argument_group("log file and memory")
    process.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help="append log lines to FILE instead of stderr; reopened on SIGHUP, for logrotate "
        "(under systemd leave it out: stderr goes to the journal)",
    )
    process.add_argument(
        "--malloc-trim-interval",
        type=seconds(allow_zero=True),
        default=DEFAULT_MALLOC_TRIM_INTERVAL,
        metavar="SECONDS",
        help="give freed heap memory back to the system this often, and as soon as a burst of "
        "connections ends, so RSS comes back down after a scan; 0: never (default: %(default)s)",
    )
    guesses = p.add_argument_group(
        "failed CONNECTs",
        "Wrong tokens and unknown IDs are limited by token buckets, per source address and per "
        "ID; past them a CONNECT gets 429 with Retry-After and its token is not even checked. "
        "An address that parked for an ID skips that ID's bucket.",
    )
    guesses.add_argument("--failures-per-address", type=int_in(1), default=PER_ADDRESS_BURST,
                         metavar="N", help="burst per address (default: %(default)s)")
    guesses.add_argument("--failure-interval-per-address", type=seconds(allow_zero=False),
                         default=PER_ADDRESS_INTERVAL, metavar="SECONDS",
                         help="then one more every SECONDS (default: %(default)s)")
    guesses.add_argument("--failures-per-id", type=int_in(1), default=PER_ID_BURST,
                         metavar="N", help="burst per ID (default: %(default)s)")
    guesses.add_argument("--failure-interval-per-id", type=seconds(allow_zero=False),
                         default=PER_ID_INTERVAL, metavar="SECONDS",
                         help="then one more every SECONDS (default: %(default)s)")
    visitors = p.add_argument_group(
        "wrong visitor passwords",
        "Entries with a visitor password: wrong passwords are limited like failed CONNECTs, by "
        "buckets of their own; past them 429 with Retry-After, the password not checked. An "
        "address that passed for an ID skips those buckets (it has an allowance of its own).",
    )
    visitors.add_argument("--visitor-failures-per-address", type=int_in(1),
                          default=PER_ADDRESS_BURST, metavar="N",
                          help="burst per address (default: %(default)s)")
    visitors.add_argument("--visitor-failure-interval-per-address",
                          type=seconds(allow_zero=False), default=PER_ADDRESS_INTERVAL,
                          metavar="SECONDS",
                          help="then one more every SECONDS (default: %(default)s)")
    visitors.add_argument("--visitor-failures-per-id", type=int_in(1), default=PER_ID_BURST,
                          metavar="N", help="burst per ID (default: %(default)s)")
    visitors.add_argument("--visitor-failure-interval-per-id", type=seconds(allow_zero=False),
                          default=PER_ID_INTERVAL, metavar="SECONDS",
                          help="then one more every SECONDS (default: %(default)s)")
    visitors.add_argument("--visitor-failures-per-connection", type=int_in(1),
                          default=DEFAULT_VISITOR_FAILURES_PER_CONNECTION, metavar="N",
                          help="close a connection after N wrong passwords (default: "
                          "%(default)s)")


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(
        pool_size=args.pool_size,
        pair_wait=args.pair_wait,
        settle=args.settle,
        head_timeout=args.head_timeout,
        handshake_timeout=args.handshake_timeout,
        max_head_size=args.max_head_size,
        max_headers=args.max_headers,
        max_client_hello=args.max_client_hello,
        max_connections=args.max_connections,
        max_per_address=args.max_per_address,
        parked_timeout=args.parked_timeout,
        pair_idle_timeout=args.pair_idle_timeout,
        registry_poll=args.registry_poll,
        entry_cache=args.entry_cache,
        guesses=GuessLimits(
            per_address_burst=args.failures_per_address,
            per_address_interval=args.failure_interval_per_address,
            per_id_burst=args.failures_per_id,
            per_id_interval=args.failure_interval_per_id,
        ),
        visitor_guesses=GuessLimits(
            per_address_burst=args.visitor_failures_per_address,
            per_address_interval=args.visitor_failure_interval_per_address,
            per_id_burst=args.visitor_failures_per_id,
            per_id_interval=args.visitor_failure_interval_per_id,
        ),
        visitor_failures_per_connection=args.visitor_failures_per_connection,
    )


def _add_cluster(p: argparse.ArgumentParser) -> None:
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
    cluster.add_argument("--cluster-key", metavar="KEY",
                         help=f"shared secret of the nodes (default: ${ENV_CLUSTER_KEY})")
    cluster.add_argument("--cluster-ttl", metavar="SECONDS", type=seconds(allow_zero=False),
                         default=DEFAULT_CLUSTER_TTL,
                         help="a node that stops heartbeating is forgotten after this long "
                              "(default: %(default)s)")
    cluster.add_argument("--cluster-window", metavar="BYTES", type=int_in(16 * 1024, 2**30),
                         default=DEFAULT_CLUSTER_WINDOW,
                         help="bytes a forwarded client may have in flight each way on an "
                              "internal link before the other node has passed them on: the most "
                              "a slow client makes a node hold for it; at least bandwidth x "
                              "round trip between nodes (default: %(default)s)")
    cluster.add_argument("--cluster-link-timeout", metavar="SECONDS",
                         type=seconds(allow_zero=False), default=DEFAULT_CLUSTER_LINK_TIMEOUT,
                         help="an internal link silent this long (no keepalive either) is "
                              "closed with its clients (default: %(default)s)")
    cluster.add_argument("--cluster-routes", metavar="N", type=int_in(0),
                         default=DEFAULT_CLUSTER_ROUTES,
                         help="IDs whose last forwarding node is remembered, so their next "
                              "client skips the Redis lookup; 0: always look up "
                              "(default: %(default)s)")


def _cluster_config(args: argparse.Namespace) -> ClusterConfig | None:
    """The cluster settings of ``serve``, or None without --cluster."""
    if args.cluster is None:
        return None
    if not args.cluster_key:
        raise ConfigError(f"--cluster needs --cluster-key or ${ENV_CLUSTER_KEY}: the nodes' "
                          "shared secret (at least 16 characters)")
    if len(args.cluster_key) < 16:
        raise ConfigError("the cluster key must be at least 16 characters")
    host, port = address(args.internal, "--internal", host_port("127.0.0.1", None))
    advertise = args.advertise
    if advertise is None and host in ("0.0.0.0", "::", ""):
        raise ConfigError("--internal binds every interface: say which address other nodes "
                          "dial with --advertise HOST:PORT")
    if advertise is not None:
        advertise = "{}:{}".format(*address(advertise, "--advertise", host_port(None, None)))
    return ClusterConfig(redis_url=args.cluster, node_id=args.node_id or socket.gethostname(),
                         internal_host=host, internal_port=port, cluster_key=args.cluster_key,
                         advertise=advertise, ttl=args.cluster_ttl,
                         window=args.cluster_window, link_timeout=args.cluster_link_timeout,
                         routes=args.cluster_routes)


def _add_admin_page(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "admin page",
        "The admin page lists, adds, rotates and removes hidden servers and shows the\n"
        "relay's live numbers; it also serves /metrics (Prometheus), /healthz and /readyz.",
    )
    group.add_argument(
        "--admin",
        nargs="?",
        const=(DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT),
        type=host_port(DEFAULT_ADMIN_HOST, DEFAULT_ADMIN_PORT),
        metavar="HOST:PORT",
        help=f"serve the admin page here, in the relay's process (with no value: "
        f"{DEFAULT_ADMIN_HOST}:{DEFAULT_ADMIN_PORT})",
    )
    admin_password_option(group)
    group.add_argument(
        "--metrics-per-id",
        action="store_true",
        help="add a parked-connections series per hidden-server ID to /metrics",
    )


def _admin_config(args: argparse.Namespace) -> AdminConfig | None:
    """The admin page's settings for ``serve`` (None without --admin); raises ConfigError for a
    page that would be open to the network."""
    given: tuple[str, int] | None = args.admin
    if given is None:
        return None
    host, port = given
    return admin_access(args, host, port, metrics_per_id=args.metrics_per_id)


# ---------------------------------------------------------------------------- the command


def _acme_config(args: argparse.Namespace) -> AcmeConfig | None:
    if not args.acme:
        return None
    if args.no_tls:
        raise ConfigError("--acme orders the relay's certificate: leave out --no-tls")
    bundle: Path | None = args.acme_ca_bundle
    if bundle is not None and not bundle.is_file():
        raise ConfigError(f"--acme-ca-bundle: no such file: {bundle}")
    hosts = [h for h in args.public_host if not _is_address(h)]
    return AcmeConfig(names=tuple(dict.fromkeys(h.lower() for h in hosts)),
                      email=args.acme_email, directory=args.acme_directory, ca_bundle=bundle,
                      orders_per_hour=args.acme_orders_per_hour, lock_ttl=args.acme_lock_ttl,
                      challenge=HTTP_01 if args.acme_http is not None else TLS_ALPN_01,
                      wildcard=_wildcard(args))


def _acme_http_config(args: argparse.Namespace) -> AcmeHttpConfig | None:
    if args.acme_http is None:
        return None
    if args.no_tls:
        raise ConfigError("--acme-http redirects to this relay's TLS port: leave out --no-tls")
    hosts = [normal_domain(h) for h in args.public_host if not _is_address(h)]
    return AcmeHttpConfig(port=args.acme_http, host=args.acme_http_host or "",
                          hosts=tuple(dict.fromkeys(hosts)), timeout=args.acme_http_timeout,
                          max_head_size=args.acme_http_max_head_size,
                          max_connections=args.acme_http_max_connections)


def _wildcard(args: argparse.Namespace) -> TLSConfig | None:
    """With --acme, --cert/--key may only be a wildcard certificate for *.DOMAIN: named hosts
    are served with it and no certificate per name is ordered."""
    if args.cert is None:
        return None
    domain = normal_domain(args.domain or "")
    refused = ConfigError("--acme orders the relay's own certificate: --cert/--key may only "
                          "give a wildcard certificate for *.DOMAIN of --domain DOMAIN")
    if not domain:
        raise refused
    try:
        names = [n.lower() for n in cert_names(Path(args.cert).read_bytes())]
    except (RendezvousError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the certificate {args.cert}: {exc}") from exc
    if f"*.{domain}" not in names:
        raise refused
    wildcard = TLSConfig(cert_file=args.cert, key_file=args.key)
    server_ssl_context(wildcard)  # a bad pair fails here, with its file names
    return wildcard


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _tls_config(args: argparse.Namespace, found: Store,
                acme: AcmeConfig | None = None) -> TLSConfig | None:
    cert: Path | None = args.cert
    key: Path | None = args.key
    if args.no_tls:
        return None
    if acme is not None and args.cluster is None:  # (a cluster's is in its Redis)
        from rendezvous.server.certificates import stored_main_files

        stored = stored_main_files(acme, found.data_dir)
        if stored is not None:
            return TLSConfig(cert_file=stored[0], key_file=stored[1])
        err("warning: no certificate from the ACME CA yet: serving a self-signed one until the "
            "order succeeds (clients will warn until then)")
    if cert is not None and key is not None and acme is None:  # (with --acme: a wildcard)
        return TLSConfig(cert_file=cert, key_file=key)
    return ensure_self_signed(found.data_dir, args.public_host,
                              warn=lambda m: err(f"warning: {m}"))


def own_argv(args: argparse.Namespace, *command: str) -> list[str]:
    """The arguments after ``command`` (e.g. ``serve``) in the command line ``main`` parsed."""
    argv: list[str] = list(getattr(args, "argv", None) or [])
    for word in command:
        argv = argv[argv.index(word) + 1:] if word in argv else []
    return argv


def resolved(parser: argparse.ArgumentParser, args: argparse.Namespace,
             argv: list[str]) -> list[settings.Setting]:
    """Apply relay.toml and the RENDEZVOUS_* variables to ``args`` (flags win)."""
    return settings.resolve(parser, args, argv)


def _serve(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    argv = own_argv(args, "serve")
    resolved(parser, args, argv)
    config, found, relay = server_config(args)
    if args.config_file is not None:
        err(f"settings: {args.config_file.resolve()}")
    _banner(config, found, relay, args.port)

    def reload() -> ServerConfig:
        # SIGHUP: the same command line over the file as it is now.
        again = parser.parse_args(argv)
        again.argv = args.argv
        resolved(parser, again, argv)
        return server_config(again, quiet=True)[0]

    # Imported here so `users` and `cert` start fast and work without the server's dependencies.
    from rendezvous.server.app import run

    return run(config, reload=reload)


def server_config(args: argparse.Namespace,
                  quiet: bool = False) -> tuple[ServerConfig, Store, RelayAddress]:
    """The relay's settings from resolved ``args`` (checked; the data folder made)."""
    found = store(args)
    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together: give both or neither")
    if args.no_tls and args.cert is not None:
        raise ConfigError("--no-tls and --cert contradict each other: choose one")
    if args.public_host and (args.no_tls or args.cert is not None) and not args.acme and not quiet:
        err("warning: --public-host only names a self-signed certificate and the host of "
            "provisioning files; the certificate part is ignored here")
    admin = _admin_config(args)  # an exposed admin page is refused before any file is made
    acme = _acme_config(args)
    registrar.prepare_data_dir(found, create=True)
    tls = _tls_config(args, found, acme)
    if tls is not None:
        server_ssl_context(tls)  # a bad pair fails here, with its file names, before the banner
    relay = registrar.own_address(found, tls, host=args.server_host, port=args.server_port,
                                  public_hosts=args.public_host)
    domain = _domain(args.domain, None if acme is not None else tls)  # ACME: one per name
    if acme is not None:
        # Provisioning files trust the system's CAs: the self-signed stopgap is soon replaced.
        relay = replace(relay, ca_pem=None)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        tls=tls,
        registry_url=found.registry_url,
        limits=_limits(args),
        log_format=args.log_format,
        log_file=args.log_file,
        log_level=args.log_level,
        use_uvloop=not args.no_uvloop,
        cluster=_cluster_config(args),
        admin=admin and replace(admin, relay=relay, domain=domain),
        data_dir=found.data_dir,
        public=relay,
        domain=domain,
        proxy_protocol_from=args.proxy_protocol_from,
        forwarded=args.forwarded,
        malloc_trim_interval=args.malloc_trim_interval,
        acme=acme,
        acme_http=_acme_http_config(args),
    )
    return config, found, relay


def _networks(text: str) -> tuple[IPNetwork, ...]:
    """--proxy-protocol-from's value, or argparse's error naming the bad part."""
    try:
        return parse_networks(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _domain(given: str | None, tls: TLSConfig | None) -> str:
    """The --domain in the form the relay compares hosts with; warn when the certificate does
    not cover its names (visitors' browsers would refuse them)."""
    if given is None:
        return ""
    domain = normal_domain(given)
    if not domain or not all(valid_name(label) for label in domain.split(".")):
        raise ConfigError(f"invalid --domain {given!r}: a DNS name such as relay.example.com")
    if tls is not None:
        with contextlib.suppress(RendezvousError, OSError, ValueError):
            names = [n.lower() for n in cert_names(tls.cert_file.read_bytes())]
            if f"*.{domain}" not in names:
                err(f"warning: the certificate {tls.cert_file} does not cover *.{domain}: "
                    f"browsers will refuse named hosts (give --cert/--key for *.{domain})")
    return domain


def _banner(config: ServerConfig, found: Store, relay: RelayAddress, listen_port: int) -> None:
    err(f"registry: {registrar.redact(config.registry_url)}")
    if config.tls is None:
        err("TLS: off (plain TCP; terminate TLS in front of the relay)")
    else:
        cert_file = config.tls.cert_file
        note = ""
        with contextlib.suppress(RendezvousError, OSError):
            if is_self_signed(cert_file.read_bytes()):
                note = " (self-signed: provisioning files carry it for hidden servers to trust)"
        err(f"certificate: {cert_file.resolve()}{note}")
    port = relay.port or (listen_port if listen_port else "the port it binds")
    err(f"provisioning files will say: server {relay.host}:{port} (recorded in "
        f"{(found.data_dir / registrar.RELAY_RECORD).resolve()} for 'users add', 'users rotate' "
        "and the admin page); if hidden servers reach the relay by another name or port, "
        "restart with --public-host NAME (and --server-port PORT behind a balancer)")
    hint = f"{PROG} users add --label NAME --data-dir {found.data_dir.resolve()}"
    if not found.registry_in_data_dir:
        hint += f" --registry {registrar.redact(config.registry_url)}"
    err(f"to add a hidden server: {hint}")
