"""Where ``serve --acme`` keeps its account, certificates and order log: files or Redis.

A lone relay keeps them in ``DATA_DIR/acme/`` (keys 0600). The nodes of a cluster share them in
the cluster's Redis, under ``rendezvous:acme:``, so that one account serves every node, one node
orders at a time (:meth:`CertificateStore.acquire`, a lock with an expiry) and every node serves
the certificate that node obtained. Pending challenges are shared there too: the CA may validate
through any node.

Every method blocks (file or network I/O): the certificate manager calls them in a thread.
Nothing here logs a key, a key authorization or a Redis password.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rendezvous.tls import write_private

if TYPE_CHECKING:
    import redis

ACME_DIR = "acme"
MAIN = "main"  # the slot of the certificate for the --public-host names
ACCOUNT_KEY = "account-key"  # items: the account's private key (PEM) ...
ACCOUNT = "account"  # ... and its registration at the CA (JSON)
CERT_FILE = "cert.pem"  # the chain the CA issued, leaf first
KEY_FILE = "key.pem"
NAMES_DIR = "names"  # DATA_DIR/acme/names/NAME.DOMAIN/: a named host's certificate
ORDERS_FILE = "orders.json"
_ITEM_FILES = {ACCOUNT_KEY: "account-key.pem", ACCOUNT: "account.json"}

REDIS_PREFIX = "rendezvous:acme:"
CHANNEL = REDIS_PREFIX + "events"  # "certificate SLOT", "dropped SLOT", "challenges SEQ"
# Seconds the ordering node waits for every node to confirm it serves a new challenge before
# it tells the CA to validate (a node that does not confirm by then is most likely dead).
SPREAD_TIMEOUT = 5.0
# Seconds an acknowledgement set lives in Redis (they are read within SPREAD_TIMEOUT).
ACK_TTL = 60

# Take the lock for ARGV[1] for ARGV[2] ms; the same owner (a node restarted with its own ID)
# takes it back at once instead of waiting for its dead predecessor's lock to expire.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# Extend the lock if ARGV[1] still holds it; delete it (ARGV[2] = 0) likewise.
_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate chain (leaf first) and its key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """What tells two certificates apart (a digest of the chain, not secret)."""
        return hashlib.sha256(self.cert_pem).hexdigest()


class CertificateStore(abc.ABC):
    """Account, certificates by slot (:data:`MAIN`, or a named host ``NAME.DOMAIN``), the log
    of recent orders, and (in a cluster) the order lock and the shared challenges."""

    shown: str  # where, for logs (no secrets)
    shared = False  # whether other nodes read it too (Redis)

    @abc.abstractmethod
    def read(self, item: str) -> bytes | None:
        """:data:`ACCOUNT_KEY` or :data:`ACCOUNT`, None when not stored yet."""

    @abc.abstractmethod
    def write(self, item: str, data: bytes) -> None:
        """Store an item (private: 0600 on disk)."""

    @abc.abstractmethod
    def load(self, slot: str) -> Certificate | None:
        """The certificate stored for ``slot``, None when there is none (or it is unreadable)."""

    @abc.abstractmethod
    def save(self, slot: str, certificate: Certificate) -> None:
        """Store ``certificate`` for ``slot``, replacing the one there (other nodes are told)."""

    @abc.abstractmethod
    def delete(self, slot: str) -> None:
        """Forget ``slot``'s certificate (a name removed); nothing when there is none."""

    @abc.abstractmethod
    def slots(self) -> list[str]:
        """Every slot with a stored certificate."""

    @abc.abstractmethod
    def recent_orders(self, since: float) -> list[float]:
        """When (epoch seconds) the orders placed since ``since`` were placed, oldest first."""

    @abc.abstractmethod
    def record_order(self, at: float, forget_before: float) -> None:
        """Log an order placed at ``at``; entries older than ``forget_before`` may go."""

    def fingerprints(self) -> dict[str, str]:
        """Slot -> fingerprint of every stored certificate (what a node compares with)."""
        found = {}
        for slot in self.slots():
            certificate = self.load(slot)
            if certificate is not None:
                found[slot] = certificate.fingerprint
        return found

    # Only a shared store has others to coordinate with: a lone relay orders one thing at a
    # time anyway, and its own Challenges answer the CA.

    def acquire(self, owner: str, ttl: float) -> bool:
        """Take the order lock for ``ttl`` seconds; False while another node holds it."""
        return True

    def refresh(self, owner: str, ttl: float) -> bool:
        """Extend the lock ``owner`` holds by ``ttl`` seconds; False if it lost it."""
        return True

    def release(self, owner: str) -> None:  # noqa: B027 - nothing to do alone
        """Give the lock back (if ``owner`` still holds it)."""

    def share_challenges(  # noqa: B027 - nothing to do alone
            self, pending: dict[str, str], ttl: float) -> None:
        """Publish pending challenges (``kind:key`` -> value) for every node to answer, for at
        most ``ttl`` seconds, and return once the nodes confirm (or after SPREAD_TIMEOUT)."""

    def withdraw_challenges(self, fields: list[str]) -> None:  # noqa: B027 - nothing alone
        """Take published challenges back."""

    def close(self) -> None:  # noqa: B027 - nothing to do alone
        """Release connections."""


class FileStore(CertificateStore):
    """``DATA_DIR/acme/``: the main certificate as ``cert.pem``/``key.pem`` (where a relay
    started without --acme-aware tooling finds it), a named host's under ``names/NAME/``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.shown = str(folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def files(self, slot: str) -> tuple[Path, Path]:
        """The certificate and key files of ``slot``."""
        base = self.folder if slot == MAIN else self.folder / NAMES_DIR / _safe(slot)
        return base / CERT_FILE, base / KEY_FILE

    def read(self, item: str) -> bytes | None:
        try:
            return (self.folder / _ITEM_FILES[item]).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, item: str, data: bytes) -> None:
        write_private(self.folder / _ITEM_FILES[item], data)

    def load(self, slot: str) -> Certificate | None:
        cert_file, key_file = self.files(slot)
        try:
            return Certificate(cert_file.read_bytes(), key_file.read_bytes())
        except OSError:
            return None

    def save(self, slot: str, certificate: Certificate) -> None:
        cert_file, key_file = self.files(slot)
        cert_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(key_file, certificate.key_pem)
        write_private(cert_file, certificate.cert_pem)

    def delete(self, slot: str) -> None:
        cert_file, key_file = self.files(slot)
        if slot == MAIN:
            cert_file.unlink(missing_ok=True)
            key_file.unlink(missing_ok=True)
        else:
            shutil.rmtree(cert_file.parent, ignore_errors=True)

    def slots(self) -> list[str]:
        found = [MAIN] if self.files(MAIN)[0].is_file() else []
        with contextlib.suppress(OSError):
            found += sorted(p.name for p in (self.folder / NAMES_DIR).iterdir()
                            if (p / CERT_FILE).is_file())
        return found

    def recent_orders(self, since: float) -> list[float]:
        return [t for t in self._orders() if t >= since]

    def record_order(self, at: float, forget_before: float) -> None:
        kept = [t for t in self._orders() if t >= forget_before] + [at]
        write_private(self.folder / ORDERS_FILE, json.dumps(sorted(kept)).encode())

    def _orders(self) -> list[float]:
        try:
            loaded = json.loads((self.folder / ORDERS_FILE).read_text())
        except (OSError, ValueError):
            return []
        return sorted(float(t) for t in loaded if isinstance(t, int | float))


class RedisStore(CertificateStore):
    """The cluster's Redis: ``rendezvous:acme:`` + ``account-key``, ``account``,
    ``cert:SLOT`` (a hash: cert, key), ``fingerprints`` (slot -> fingerprint), ``orders`` (a
    sorted set of times), ``lock`` (the order lock), ``challenges`` (kind:key -> value and
    expiry) and ``ack:SEQ``; changes are announced on ``rendezvous:acme:events``."""

    shared = True

    def __init__(self, url: str, shown: str) -> None:
        import redis

        self.shown = shown
        self.url = url  # may hold a password: never logged
        self.client: redis.Redis = redis.Redis.from_url(url, socket_connect_timeout=5,
                                                        socket_timeout=5)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._refresh = self.client.register_script(_REFRESH)

    def read(self, item: str) -> bytes | None:
        return cast("bytes | None", self.client.get(REDIS_PREFIX + item))

    def write(self, item: str, data: bytes) -> None:
        self.client.set(REDIS_PREFIX + item, data)

    def load(self, slot: str) -> Certificate | None:
        found = cast("list[bytes | None]",
                     self.client.hmget(REDIS_PREFIX + "cert:" + slot, ["cert", "key"]))
        cert_pem, key_pem = found
        if not cert_pem or not key_pem:
            return None
        return Certificate(cert_pem, key_pem)

    def save(self, slot: str, certificate: Certificate) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(REDIS_PREFIX + "cert:" + slot,
                      mapping={"cert": certificate.cert_pem, "key": certificate.key_pem})
            pipe.hset(REDIS_PREFIX + "fingerprints", slot, certificate.fingerprint)
            pipe.publish(CHANNEL, f"certificate {slot}")
            pipe.execute()

    def delete(self, slot: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(REDIS_PREFIX + "cert:" + slot)
            pipe.hdel(REDIS_PREFIX + "fingerprints", slot)
            pipe.publish(CHANNEL, f"dropped {slot}")
            pipe.execute()

    def slots(self) -> list[str]:
        return sorted(self.fingerprints())

    def fingerprints(self) -> dict[str, str]:
        found = cast("dict[bytes, bytes]", self.client.hgetall(REDIS_PREFIX + "fingerprints"))
        return {k.decode(): v.decode() for k, v in found.items()}

    def recent_orders(self, since: float) -> list[float]:
        found = cast("list[tuple[bytes, float]]", self.client.zrangebyscore(
            REDIS_PREFIX + "orders", since, "+inf", withscores=True))
        return [score for _member, score in found]

    def record_order(self, at: float, forget_before: float) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zadd(REDIS_PREFIX + "orders", {f"{at}:{secrets.token_hex(4)}": at})
            pipe.zremrangebyscore(REDIS_PREFIX + "orders", "-inf", forget_before)
            pipe.execute()

    def acquire(self, owner: str, ttl: float) -> bool:
        return bool(self._acquire(keys=[REDIS_PREFIX + "lock"], args=[owner, _ms(ttl)]))

    def refresh(self, owner: str, ttl: float) -> bool:
        return bool(self._refresh(keys=[REDIS_PREFIX + "lock"], args=[owner, _ms(ttl)]))

    def release(self, owner: str) -> None:
        self._refresh(keys=[REDIS_PREFIX + "lock"], args=[owner, 0])

    def share_challenges(self, pending: dict[str, str], ttl: float) -> None:
        stale = set(self._raw_challenges()) - set(self.challenges())  # a dead node's
        if stale:
            self.client.hdel(REDIS_PREFIX + "challenges", *stale)
        until = time.time() + ttl
        self.client.hset(REDIS_PREFIX + "challenges", mapping={
            field: json.dumps({"value": value, "until": until})
            for field, value in pending.items()})
        seq = secrets.token_hex(8)
        listeners = int(self.client.publish(CHANNEL, f"challenges {seq}"))
        deadline = time.monotonic() + SPREAD_TIMEOUT
        while time.monotonic() < deadline:
            if int(self.client.scard(REDIS_PREFIX + "ack:" + seq)) >= listeners:
                return
            time.sleep(0.02)

    def withdraw_challenges(self, fields: list[str]) -> None:
        if fields:
            self.client.hdel(REDIS_PREFIX + "challenges", *fields)
            self.client.publish(CHANNEL, "challenges -")

    def challenges(self) -> dict[str, str]:
        """The published challenges that have not expired (``kind:key`` -> value)."""
        now = time.time()
        pending = {}
        for field, raw in self._raw_challenges().items():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                item: dict[str, Any] = json.loads(raw)
                if float(item["until"]) > now:
                    pending[field] = str(item["value"])
        return pending

    def _raw_challenges(self) -> dict[str, bytes]:
        found = cast("dict[bytes, bytes]", self.client.hgetall(REDIS_PREFIX + "challenges"))
        return {k.decode("utf-8", "replace"): v for k, v in found.items()}

    def acknowledge(self, seq: str, node: str) -> None:
        """Confirm that ``node`` serves the challenges announced as ``seq``."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(REDIS_PREFIX + "ack:" + seq, node)
            pipe.expire(REDIS_PREFIX + "ack:" + seq, ACK_TTL)
            pipe.execute()

    def close(self) -> None:
        self.client.close()


def _safe(slot: str) -> str:
    """A slot as a folder name (a DNS name already is one; anything else is refused)."""
    if not slot or "/" in slot or slot.startswith("."):
        raise ValueError(f"not a certificate slot: {slot!r}")
    return slot


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
