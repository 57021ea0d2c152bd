"""Settings, as small frozen dataclasses built once (by the CLI) and passed down."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from rendezvous.errors import ConfigError

DEFAULT_PORT = 8899
DEFAULT_DATA_DIR = Path("data")
# Environment variables a command reads when its flag is not given.
ENV_DATA_DIR = "RENDEZVOUS_DATA_DIR"
ENV_REGISTRY = "RENDEZVOUS_REGISTRY"
ENV_CLUSTER_KEY = "RENDEZVOUS_CLUSTER_KEY"

# Limits. Each has a flag; these defaults suit a relay on the open Internet.
DEFAULT_POOL_SIZE = 8  # parked connections kept per ID; the oldest is closed when full
DEFAULT_PAIR_WAIT = 2.0  # seconds a mobile client waits for a parked connection before 404
# A freshly parked connection is held back this long before pairing, so the hidden server reads
# the `200` and the mobile request in separate reads (old agents drop a request that comes with it).
DEFAULT_SETTLE = 0.010
DEFAULT_HEAD_TIMEOUT = 15.0  # seconds from accept to a complete request head
# Seconds to finish the TLS handshake (within the head timeout): real clients need < 1 s.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_HEAD_SIZE = 16 * 1024  # bytes; beyond it 431 (real clients send < 4 KiB)
DEFAULT_MAX_HEADERS = 100  # header lines; beyond it 431
# Bytes of a TLS ClientHello read before the handshake while an ACME TLS-ALPN-01 challenge is
# pending (post-quantum key shares make browsers' ~2 KiB); a longer one gets the normal context.
DEFAULT_MAX_CLIENT_HELLO = 16 * 1024
DEFAULT_MAX_CONNECTIONS = 15_000  # open client connections; the machine allows 20,000 files
# One address may hold this many connections at once (a NATed office shares one address).
DEFAULT_MAX_PER_ADDRESS = 512
# A parked connection unpaired this long is closed; agents recycle theirs sooner (5 min).
DEFAULT_PARKED_TIMEOUT = 900.0
# A pairing with no byte either way this long is closed (0: never). Generous: a WebSocket app
# that pings every few minutes, or a slow hidden server thinking, must not be cut.
DEFAULT_PAIR_IDLE_TIMEOUT = 600.0
# Seconds between checks for registry changes made by other processes (SQLite; Redis is told at
# once): a rotation or removal by the CLI cuts the old parked connections within about this long.
DEFAULT_REGISTRY_POLL = 0.5
# Registry entries kept in memory (each a few hundred bytes), so a CONNECT for a known ID costs
# no registry read; the registry's change watch keeps them current. 0: read every time.
DEFAULT_ENTRY_CACHE = 10_000
# Seconds between two malloc_trim(0) calls, which give a burst's freed heap back (server/memory.py).
DEFAULT_MALLOC_TRIM_INTERVAL = 10.0


# Failed CONNECTs (wrong token, unknown ID) allowed before 429; README.md gives the odds.
PER_ADDRESS_BURST = 20  # failures an address may make at once ...
PER_ADDRESS_INTERVAL = 10.0  # ... then one more every this many seconds
PER_ID_BURST = 10  # failures against one ID at once ...
PER_ID_INTERVAL = 120.0  # ... then one more every this many seconds
TRUST_SECONDS = 24 * 3600  # an address that parked for an ID skips the ID's limit this long
# Wrong visitor passwords have buckets of their own, with the same defaults (GuessLimits);
# a connection is closed after this many, so one connection cannot pipeline guesses.
DEFAULT_VISITOR_FAILURES_PER_CONNECTION = 3


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``CIDR[,CIDR...]`` (a bare address is a /32 or /128) as networks; ConfigError if bad."""
    found = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            found.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{part!r} is not an IP network (CIDR such as 10.0.0.0/8)") from None
    return tuple(found)


def default_registry_url(data_dir: Path) -> str:
    """The embedded default: a SQLite file in the data folder."""
    return f"sqlite:///{(data_dir / 'registry.sqlite3').resolve()}"


@dataclass(frozen=True, slots=True)
class Store:
    """Where a command keeps its files (the data folder) and finds the registry."""

    data_dir: Path = DEFAULT_DATA_DIR
    registry_url: str = ""  # "": the SQLite file in the data folder

    def __post_init__(self) -> None:
        if not self.registry_url:
            object.__setattr__(self, "registry_url", default_registry_url(self.data_dir))

    @property
    def registry_in_data_dir(self) -> bool:
        """Whether the registry is the default SQLite file inside the data folder."""
        return self.registry_url == default_registry_url(self.data_dir)


@dataclass(frozen=True, slots=True)
class GuessLimits:
    """Settings of a failed-guess limiter (server/ratelimit.py): CONNECT tokens, or visitor
    passwords."""

    per_address_burst: int = PER_ADDRESS_BURST
    per_address_interval: float = PER_ADDRESS_INTERVAL
    per_id_burst: int = PER_ID_BURST
    per_id_interval: float = PER_ID_INTERVAL
    trust_seconds: float = TRUST_SECONDS


@dataclass(frozen=True, slots=True)
class Limits:
    """What one peer may cost the relay before it gets an error or a close."""

    pool_size: int = DEFAULT_POOL_SIZE
    pair_wait: float = DEFAULT_PAIR_WAIT
    settle: float = DEFAULT_SETTLE
    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_head_size: int = DEFAULT_MAX_HEAD_SIZE
    max_headers: int = DEFAULT_MAX_HEADERS
    max_client_hello: int = DEFAULT_MAX_CLIENT_HELLO
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    parked_timeout: float = DEFAULT_PARKED_TIMEOUT
    pair_idle_timeout: float = DEFAULT_PAIR_IDLE_TIMEOUT
    registry_poll: float = DEFAULT_REGISTRY_POLL
    entry_cache: int = DEFAULT_ENTRY_CACHE
    guesses: GuessLimits = field(default_factory=GuessLimits)  # CONNECT tokens
    visitor_guesses: GuessLimits = field(default_factory=GuessLimits)  # visitor passwords
    visitor_failures_per_connection: int = DEFAULT_VISITOR_FAILURES_PER_CONNECTION


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Certificate and key files (PEM) the listener presents."""

    cert_file: Path
    key_file: Path


# ACME (serve --acme) ------------------------------------------------------------------------

LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
# Renew when this fraction of a certificate's lifetime has passed (Let's Encrypt's advice: 2/3,
# which leaves a 90-day certificate 30 days of retries).
DEFAULT_ACME_RENEW_FRACTION = 2 / 3
# A failed order is retried after this many seconds, doubling up to the maximum (a CA's rate
# limits count failed validations: hammering it makes things worse).
DEFAULT_ACME_RETRY_FIRST = 60.0
DEFAULT_ACME_RETRY_MAX = 6 * 3600.0
# Seconds one order (validation and issuance) may take before it counts as failed.
DEFAULT_ACME_ORDER_TIMEOUT = 120.0
# Orders (every name's, renewals too) one relay or cluster places per hour at most: a name
# past it waits. Let's Encrypt allows 300 new orders per account per 3 hours; a flood of new
# names must not use them up (nor its failed-validation limit).
DEFAULT_ACME_ORDERS_PER_HOUR = 20
# Seconds the order lock of a cluster lasts unless its holder extends it (every third of it,
# while the order runs): a node that dies mid-order blocks the others this long at most.
DEFAULT_ACME_LOCK_TTL = 30.0
# Seconds between a cluster node's full comparisons with Redis, behind pub/sub: the longest a
# node serves an old certificate after a missed message.
DEFAULT_ACME_SYNC_INTERVAL = 10.0
TLS_ALPN_01 = "tls-alpn-01"  # validated on the relay's own TLS port (the default)
HTTP_01 = "http-01"  # validated on the --acme-http listener
# The plain-HTTP listener (--acme-http) is port 80 on the open Internet: scanners all day.
DEFAULT_ACME_HTTP_TIMEOUT = 10.0  # seconds from accept to a complete request head
DEFAULT_ACME_HTTP_MAX_HEAD = 8 * 1024  # bytes of a head; beyond it 431 (CAs send < 1 KiB)
DEFAULT_ACME_HTTP_MAX_CONNECTIONS = 1024  # open at once; past it a new one is closed (503)


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    """``serve --acme``: a certificate from an ACME CA for ``names`` (and, with a domain, one
    per named entry), kept in the data dir, or in the cluster's Redis with ``--cluster``."""

    names: tuple[str, ...]
    email: str | None = None  # the account's contact; the CA mails expiry warnings there
    directory: str = LETS_ENCRYPT_DIRECTORY
    ca_bundle: Path | None = None  # trust this CA file for the directory (a private ACME server)
    renew_fraction: float = DEFAULT_ACME_RENEW_FRACTION
    retry_first: float = DEFAULT_ACME_RETRY_FIRST
    retry_max: float = DEFAULT_ACME_RETRY_MAX
    order_timeout: float = DEFAULT_ACME_ORDER_TIMEOUT
    orders_per_hour: int = DEFAULT_ACME_ORDERS_PER_HOUR
    orders_window: float = 3600.0  # the "hour" of orders_per_hour (tests shorten it)
    lock_ttl: float = DEFAULT_ACME_LOCK_TTL
    sync_interval: float = DEFAULT_ACME_SYNC_INTERVAL
    challenge: str = TLS_ALPN_01  # or HTTP_01 (with --acme-http)
    # --cert/--key with --acme: the operator's certificate for *.DOMAIN, which named hosts get
    # (it wins: no certificate per name is ordered then).
    wildcard: TLSConfig | None = None

    def __post_init__(self) -> None:
        if self.orders_per_hour < 1:
            raise ConfigError(f"orders per hour must be at least 1, not {self.orders_per_hour}")
        if self.challenge not in (TLS_ALPN_01, HTTP_01):
            raise ConfigError(f"unknown ACME challenge type {self.challenge!r}")
        if not self.names:
            raise ConfigError("--acme needs at least one --public-host NAME to certify")
        if not 0 < self.renew_fraction < 1:
            raise ConfigError(f"renew fraction must be between 0 and 1, not {self.renew_fraction}")


@dataclass(frozen=True, slots=True)
class AcmeHttpConfig:
    """``serve --acme-http PORT``: a plain-HTTP listener answering HTTP-01 challenges and
    redirecting every other request to ``https://`` on one of ``hosts`` (or NAME.DOMAIN)."""

    port: int
    host: str = ""  # "": the relay's --host
    hosts: tuple[str, ...] = ()  # the --public-host names redirects may go to; first: fallback
    timeout: float = DEFAULT_ACME_HTTP_TIMEOUT
    max_head_size: int = DEFAULT_ACME_HTTP_MAX_HEAD
    max_connections: int = DEFAULT_ACME_HTTP_MAX_CONNECTIONS


DEFAULT_CLUSTER_TTL = 6.0  # seconds a relay node stays listed in Redis without a heartbeat
# Bytes a forwarded client may have in flight, each way, on an internal link before the receiving
# node has passed them on: what a slow visitor can make a node hold for it (less than the kernel
# may buffer for its socket). It must cover the link's bandwidth times its round trip, and a busy
# node's loop adds milliseconds to that: 1 MiB is 1 Gbit/s at 8 ms (on this 2-core machine a
# forwarded download moved ~30% faster than with 256 KiB).
DEFAULT_CLUSTER_WINDOW = 1024 * 1024
# An internal link that has said nothing (not even its keepalive, sent after a third of this)
# for this long is closed: a node that vanished without a FIN costs at most this.
DEFAULT_CLUSTER_LINK_TIMEOUT = 10.0
# IDs whose last forwarding node is remembered (their next client skips the Redis lookup).
DEFAULT_CLUSTER_ROUTES = 10_000


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``serve --cluster``: the Redis shared by the relay nodes and how this node is reached."""

    redis_url: str
    node_id: str
    internal_host: str
    internal_port: int
    cluster_key: str = field(repr=False)
    advertise: str | None = None  # host:port other nodes dial; default the internal address
    ttl: float = DEFAULT_CLUSTER_TTL
    window: int = DEFAULT_CLUSTER_WINDOW  # per forwarded client, each way, on a link
    link_timeout: float = DEFAULT_CLUSTER_LINK_TIMEOUT  # seconds a silent link is kept
    routes: int = DEFAULT_CLUSTER_ROUTES  # remembered ID -> node; 0: always ask Redis


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `rendezvous serve` needs; built once by the CLI."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    tls: TLSConfig | None = None  # None: plain TCP, behind a TLS-terminating balancer
    registry_url: str = "memory://"
    limits: Limits = field(default_factory=Limits)
    log_format: str = "text"  # or "json"
    log_file: Path | None = None  # None: stderr (the journal under systemd); reopened on SIGHUP
    log_level: str = "info"  # or "debug", "warning", "error"
    use_uvloop: bool = True
    cluster: ClusterConfig | None = None  # several nodes on one Redis; None: a lone relay
    admin: AdminConfig | None = None  # the admin page next to the relay (serve --admin); None: off
    # Where the relay records its public address (relay.json) and answers `rendezvous status`
    # (a Unix socket); None: neither (a relay embedded in tests or another program).
    data_dir: Path | None = None
    public: RelayAddress | None = None  # what provisioning files say; port None: the bound one
    # serve --domain: a request for NAME.DOMAIN goes to the entry named NAME; "" for none.
    domain: str = ""
    # serve --proxy-protocol-from: peers (a load balancer) whose connections start with a
    # PROXY header (v1 or v2) naming the real client; from anyone else such a header is refused.
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    # serve --forwarded: tell the hidden server who the visitor is (a Forwarded header, RFC
    # 7239) in every request head passed on; off by default, for byte compatibility.
    forwarded: bool = False
    malloc_trim_interval: float = DEFAULT_MALLOC_TRIM_INTERVAL  # seconds; 0: never
    # Certificates ordered from an ACME CA (needs tls and data_dir); None: the files of tls only.
    acme: AcmeConfig | None = None
    acme_http: AcmeHttpConfig | None = None  # the plain-HTTP listener; None: none


# The admin page (registrar) ---------------------------------------------------------------

DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 8893  # where node-rendezvous's registrar listened
ENV_ADMIN_PASSWORD = "RENDEZVOUS_ADMIN_PASSWORD"
# Wrong admin passwords one address may try, by any way in (login form, /metrics' Bearer or
# Basic), before 429 ... then one more every this many seconds. Each also costs 1 s in all.
DEFAULT_ADMIN_FAILURES = 5
DEFAULT_ADMIN_FAILURE_INTERVAL = 60.0


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` reaches this machine only: 127.0.0.0/8, ::1, ``localhost`` or a name
    under ``.localhost`` (RFC 6761 keeps those on loopback).

    An empty host, ``0.0.0.0`` and ``::`` bind every interface, so they are not loopback.
    """
    name = host.strip("[]").lower().removesuffix(".")
    if name in ("localhost", "localhost.localdomain") or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """Where hidden servers reach the relay, as provisioning files tell them (docs/protocol.md §5).

    Built once per command: ``serve`` records its own in the data folder (relay.json), and
    every command that writes provisioning files (``users add``/``rotate``, the admin page)
    starts from that record.
    """

    host: str
    port: int | None = None  # None: the port of the relay in this process (else DEFAULT_PORT)
    ca_pem: str | None = field(default=None, repr=False)  # None: a public CA issued its cert


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin page: where it listens and who may use it.

    Without a password it must bind a loopback address: anyone who reaches the page can read
    every hidden server's secret. Raises ConfigError otherwise, so it never starts exposed.
    """

    host: str = DEFAULT_ADMIN_HOST
    port: int = DEFAULT_ADMIN_PORT
    password: str | None = field(default=None, repr=False)  # None: no login (loopback only)
    metrics_per_id: bool = False  # a parked-connections series per ID on /metrics
    password_failures: int = DEFAULT_ADMIN_FAILURES
    password_failure_interval: float = DEFAULT_ADMIN_FAILURE_INTERVAL
    relay: RelayAddress = field(default_factory=lambda: RelayAddress("localhost"))
    domain: str = ""  # the relay's --domain: named entries' visitor URLs are under it

    def __post_init__(self) -> None:
        if self.password is not None and not self.password:
            raise ConfigError("the admin password is empty")
        if self.password is None and not is_loopback_host(self.host):
            raise ConfigError(
                f"the admin page on {self.host or 'every interface'} would be open to the "
                f"network: bind 127.0.0.1, or set a password with --admin-password or "
                f"${ENV_ADMIN_PASSWORD}"
            )


# The agents --------------------------------------------------------------------------------

DEFAULT_AGENT_POOL = 4  # connections a hidden server keeps parked: visitors served at once
# A parked connection is replaced after this long, so none sits silently dead behind a NAT.
DEFAULT_MAX_PARK_AGE = 300.0
DEFAULT_BACKOFF_CAP = 30.0  # longest wait between attempts while the relay is unreachable
DEFAULT_AUTH_RETRY = 60.0  # wait between attempts while the relay refuses our credentials
DEFAULT_STATUS_INTERVAL = 60.0  # period of the agent's status log line
DEFAULT_GRACE = 10.0  # seconds active pairings get to finish after SIGINT/SIGTERM
DEFAULT_LISTEN = ("127.0.0.1", 8080)  # where ``rendezvous open`` listens
# The password that goes with the ID when the hidden server checks no visitors: the relay
# then reads only the user name (node-rendezvous's clients send "x").
DEFAULT_VISITOR_PASSWORD = "x"
ENV_VISITOR_PASSWORD = "RENDEZVOUS_VISITOR_PASSWORD"  # for `open`/`get`: out of the process list


@dataclass(frozen=True, slots=True)
class HiddenAgentConfig:
    """``rendezvous hidden``: how the hidden server's agent parks and what it forwards to."""

    provisioning_file: Path
    forward: tuple[str, int]  # the local service each pairing goes to
    servers: tuple[tuple[str, int], ...] = ()  # (): the provisioning file's relay
    pool: int = DEFAULT_AGENT_POOL
    max_park_age: float = DEFAULT_MAX_PARK_AGE
    backoff_cap: float = DEFAULT_BACKOFF_CAP
    auth_retry: float = DEFAULT_AUTH_RETRY
    status_interval: float = DEFAULT_STATUS_INTERVAL
    grace: float = DEFAULT_GRACE
    log_format: str = "text"
    use_uvloop: bool = True
    # 1 or 2: the local service gets a PROXY header per pairing; 0: none; None: as the
    # provisioning file says (its proxyProtocol)
    proxy_protocol: int | None = None


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """``rendezvous open`` and ``get``: which hidden server, through which relay, as whom."""

    uuid: str
    server: tuple[str, int]
    ca_pem: str | None = field(default=None, repr=False)  # None: the system's trust store
    listen: tuple[str, int] = DEFAULT_LISTEN
    auth: str = "basic"  # or "digest"
    password: str = field(default=DEFAULT_VISITOR_PASSWORD, repr=False)
    log_format: str = "text"
    use_uvloop: bool = True
