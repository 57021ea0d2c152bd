"""Settings, as small frozen dataclasses built once (by the CLI) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 8899
DEFAULT_DATA_DIR = Path("data")

# Limits. Each has a flag; these defaults suit a relay on the open Internet.
DEFAULT_POOL_SIZE = 8  # parked connections kept per ID; the oldest is closed when full
DEFAULT_PAIR_WAIT = 2.0  # seconds a mobile client waits for a parked connection before 404
# A freshly parked connection is held back this long before pairing, so the hidden server reads
# the `200` and the mobile request in separate reads (old agents drop a request that comes with it).
DEFAULT_SETTLE = 0.010
DEFAULT_HEAD_TIMEOUT = 15.0  # seconds to finish the TLS handshake and send a request head
DEFAULT_MAX_HEAD_SIZE = 16 * 1024  # bytes; beyond it 431 (real clients send < 4 KiB)
DEFAULT_MAX_HEADERS = 100  # header lines; beyond it 431
DEFAULT_MAX_CONNECTIONS = 15_000  # open client connections; the machine allows 20,000 files
# One address may hold this many connections at once (a NATed office shares one address).
DEFAULT_MAX_PER_ADDRESS = 512
# A parked connection unpaired this long is closed; agents recycle theirs sooner (5 min).
DEFAULT_PARKED_TIMEOUT = 900.0


# Failed CONNECTs (wrong token, unknown ID) allowed before 429; README.md gives the odds.
PER_ADDRESS_BURST = 20  # failures an address may make at once ...
PER_ADDRESS_INTERVAL = 10.0  # ... then one more every this many seconds
PER_ID_BURST = 10  # failures against one ID at once ...
PER_ID_INTERVAL = 60.0  # ... then one more every this many seconds
TRUST_SECONDS = 24 * 3600  # an address that parked for an ID skips the ID's limit this long


def default_registry_url(data_dir: Path) -> str:
    """The embedded default: a SQLite file in the data folder."""
    return f"sqlite:///{(data_dir / 'registry.sqlite3').resolve()}"


@dataclass(frozen=True, slots=True)
class GuessLimits:
    """Settings of the failed-CONNECT limiter (server/ratelimit.py)."""

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
    max_head_size: int = DEFAULT_MAX_HEAD_SIZE
    max_headers: int = DEFAULT_MAX_HEADERS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    parked_timeout: float = DEFAULT_PARKED_TIMEOUT
    guesses: GuessLimits = field(default_factory=GuessLimits)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Certificate and key files (PEM) the listener presents."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `rendezvous serve` needs; built once by the CLI."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    tls: TLSConfig | None = None  # None: plain TCP, behind a TLS-terminating balancer
    registry_url: str = "memory://"
    limits: Limits = field(default_factory=Limits)
    log_format: str = "text"  # or "json"
    use_uvloop: bool = True
