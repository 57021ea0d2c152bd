"""The registrar's use-cases, shared by the CLI and the admin page.

    prepare_data_dir   make sure the data folder exists (or explain why it does not)
    with_registry      open the registry, check it answers, run one operation, close it
    provision          change the registry, write the provisioning file, undo the change if
                       the file cannot be written
    own_address        what a relay about to start tells hidden servers about itself
    public_address     the relay address a new provisioning file gives its hidden server
    renaming           give an entry a name (a plain URL for visitors), or clear it
    remember_relay     what ``serve`` records in DATA_DIR/relay.json at start
    recall_relay       ... and what every command that writes files reads back

The relay's public address is *remembered*, not re-guessed: ``serve`` writes where it listens
and under which name (DATA_DIR/relay.json); ``users add``, ``users rotate`` and the admin page
start from that record, so a file always points at the relay that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from rendezvous.config import (
    DEFAULT_PORT,
    ENV_DATA_DIR,
    RelayAddress,
    Store,
    TLSConfig,
    is_loopback_host,
)
from rendezvous.errors import ConfigError, ProvisioningError, RegistryError, UnknownEntry
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.protocol.hostnames import visitor_url
from rendezvous.provisioning import (
    Provisioning,
    default_server_host,
    load_provisioning,
    provisioning_document,
    self_signed_pem,
    write_private_json,
    write_provisioning,
)
from rendezvous.registry import Entry, Registry, open_registry
from rendezvous.registry.base import normal_name
from rendezvous.tls import CERT_FILE, ensure_self_signed, read_cert_pem

T = TypeVar("T")

# An operator's command should fail, not hang, when the registry's host drops packets.
REGISTRY_TIMEOUT = 10.0
RELAY_RECORD = "relay.json"  # in the data folder: where the relay listens, under which name
PROVISION_DIR = "provision"  # in the data folder: the files ``users add`` writes
# IDs that are safe as file names (an old node-rendezvous ID may not be).
_FILE_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")

Undo = Callable[[], Awaitable[None]]
Change = Callable[[Registry], Awaitable[tuple[Entry, Undo]]]
"""A registry change: makes it, returns the new entry and how to take the change back."""


# ---------------------------------------------------------------------------- data folder, registry


def prepare_data_dir(store: Store, *, create: bool) -> None:
    """Make sure the default SQLite registry's folder exists (create it, or explain its absence).

    A command that only reads stops here rather than creating an empty registry in a mistyped
    folder and reporting that it holds nobody.
    """
    data_dir = store.data_dir
    if not store.registry_in_data_dir or data_dir.is_dir():
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


def redact(url: str) -> str:
    """``url`` with any password masked, for banners and messages."""
    if urlsplit(url).password is None:
        return url
    # Only Redis URLs carry passwords; importing its backend only then keeps `users` quick.
    from rendezvous.registry.redis import redacted

    return redacted(url)


def with_registry(url: str, op: Callable[[Registry], Awaitable[T]]) -> T:
    """Open the registry at ``url``, check it answers, run ``op`` on it and close it (for a
    one-shot command: runs its own event loop). Raises RegistryError after REGISTRY_TIMEOUT."""

    async def run() -> T:
        registry = open_registry(url)
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT):
                await registry.ping()
                return await op(registry)
        except TimeoutError:
            raise RegistryError(
                f"registry {redact(url)} did not answer within {REGISTRY_TIMEOUT:g} s"
            ) from None
        finally:
            # Failing to release a connection in a one-shot process harms nothing, and must
            # not hide the error that brought us here.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REGISTRY_TIMEOUT):
                    await registry.close()

    return asyncio.run(run())


async def get_entry(registry: Registry, uuid: str) -> Entry:
    """The entry ``uuid``; raises UnknownEntry when there is none."""
    entry = await registry.get(uuid)
    if entry is None:
        raise UnknownEntry(uuid)
    return entry


# ---------------------------------------------------------------------------- provisioning


def adding(entry: Entry) -> Change:
    """The change that adds ``entry`` (DuplicateEntry if its ID is taken)."""

    async def change(registry: Registry) -> tuple[Entry, Undo]:
        await registry.add(entry)
        return entry, lambda: registry.remove(entry.uuid)

    return change


def rotating(uuid: str, *, proxy_protocol: int | None = None, server_host: str | None = None,
             server_port: int | None = None) -> Change:
    """The change that gives entry ``uuid`` a new secret (UnknownEntry if there is none), and
    for its files the PROXY option ``proxy_protocol`` and the relay address ``server_host``,
    ``server_port`` when given (None keeps the entry's)."""

    async def change(registry: Registry) -> tuple[Entry, Undo]:
        old = await get_entry(registry, uuid)
        new = old.rotated()
        if proxy_protocol is not None:
            new = replace(new, proxy_protocol=proxy_protocol)
        if server_host is not None:
            new = replace(new, server_host=server_host)
        if server_port is not None:
            new = replace(new, server_port=server_port)
        await registry.replace(new)
        return new, lambda: registry.replace(old)

    return change


def renaming(uuid: str, name: str) -> Callable[[Registry], Awaitable[Entry]]:
    """The operation that gives ``uuid`` the name ``name`` ("" to clear it; ConfigError when it
    is not one DNS label, DuplicateName when another entry has it); it returns the entry."""
    name = normal_name(name)

    async def op(registry: Registry) -> Entry:
        old = await get_entry(registry, uuid)
        new = replace(old, name=name, updated=time.time())
        await registry.replace(new)
        return new

    return op


def set_visitor_password(
    uuid: str, password: str | None
) -> Callable[[Registry], Awaitable[Entry]]:
    """The operation that makes visitors of ``uuid`` log in with ``password`` (None: no check,
    any password, as node-rendezvous); it returns the changed entry."""
    secret = VisitorSecret.from_password(uuid, password) if password is not None else None

    async def op(registry: Registry) -> Entry:
        old = await get_entry(registry, uuid)
        new = replace(old, visitor=secret, updated=time.time())
        await registry.replace(new)
        return new

    return op


async def provision(
    registry: Registry, change: Change, relay: RelayAddress, out: Path | None = None
) -> tuple[Entry, dict[str, Any]]:
    """Make ``change``, then the new entry's provisioning document for ``relay``, written to
    ``out`` (mode 0600) when given. The entry and the document.

    Should the file fail to be written, the change is taken back, so no hidden server is left
    with a secret that nobody holds; the ProvisioningError is raised.
    """
    entry, undo = await change(registry)
    doc = provisioning_document(entry, relay.host, relay.port or DEFAULT_PORT, relay.ca_pem)
    if out is not None:
        try:
            write_provisioning(doc, out)
        except ProvisioningError:
            await undo()
            raise
    return entry, doc


def provisioning_path(store: Store, uuid: str) -> Path:
    """Where ``users add`` puts the file of ``uuid`` by default: DATA_DIR/provision/ID.json."""
    if not _FILE_SAFE_ID.fullmatch(uuid):
        raise ConfigError(f"ID {uuid!r} cannot be a file name: pass --out FILE")
    return store.data_dir / PROVISION_DIR / f"{uuid}.json"


def previous_file(path: Path | None, uuid: str) -> Provisioning | None:
    """The provisioning file of ``uuid`` at ``path``, if one is there and readable."""
    if path is None or not path.is_file():
        return None
    with contextlib.suppress(ProvisioningError):
        found = load_provisioning(path)
        if found.uuid == uuid:
            return found
    return None


# ---------------------------------------------------------------------------- the relay's address


@dataclass(frozen=True, slots=True)
class RelayRecord:
    """DATA_DIR/relay.json: what the relay that last started with this data folder said."""

    host: str  # the public name provisioning files give
    port: int  # the public port (the listening one unless --server-port said otherwise)
    cert_file: Path | None  # the certificate it presents; None: plain TCP (--no-tls)
    listening: tuple[str, ...] = ()  # its listening addresses, host:port
    status_socket: Path | None = None  # where ``rendezvous status`` asks it for numbers
    pid: int = 0
    started: float = 0.0
    domain: str = ""  # serve --domain: named hidden servers are NAME.DOMAIN; "" for none
    # serve --acme: its certificate comes from a CA that clients trust (the self-signed one
    # of a first start is a stopgap), so files carry no certificate to pin.
    acme: bool = False

    def visitor_url(self, name: str) -> str | None:
        """The URL visitors open for the hidden server named ``name``; None with no domain.
        Always https: a relay on plain TCP (--no-tls) sits behind a TLS-terminating balancer."""
        if not name or not self.domain:
            return None
        return visitor_url(name, self.domain, self.port)

    def address(self) -> tuple[RelayAddress, str]:
        """The address files should carry, with the certificate as it is *now* (a renewed
        self-signed one is what the relay presents after SIGHUP); and where the CA came from."""
        if self.cert_file is None:
            return RelayAddress(self.host, self.port), "none (the relay speaks plain TCP)"
        if self.acme:
            return (RelayAddress(self.host, self.port),
                    "none (the relay's certificate comes from its ACME CA)")
        pem = self_signed_pem(self.cert_file)
        origin = (f"{self.cert_file} (self-signed)" if pem is not None
                  else "none (the relay's certificate chains to a public CA)")
        return RelayAddress(self.host, self.port, pem), origin


def remember_relay(data_dir: Path, record: RelayRecord) -> Path:
    """Write ``record`` to DATA_DIR/relay.json (atomically, mode 0600); its path."""
    path = data_dir / RELAY_RECORD
    doc = {
        "host": record.host,
        "port": record.port,
        "cert": str(record.cert_file.resolve()) if record.cert_file is not None else None,
        "listening": list(record.listening),
        "status": str(record.status_socket) if record.status_socket is not None else None,
        "pid": record.pid,
        "started": record.started,
        **({"domain": record.domain} if record.domain else {}),
        **({"acme": True} if record.acme else {}),
    }
    try:
        write_private_json(doc, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def recall_relay(data_dir: Path) -> RelayRecord | None:
    """DATA_DIR/relay.json, or None when no relay has started with this data folder.

    Raises ConfigError naming the file when it is there but unreadable or malformed.
    """
    path = data_dir / RELAY_RECORD
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        doc = json.loads(text)
        host, port, cert = doc["host"], doc["port"], doc.get("cert")
        status = doc.get("status")
        if (not isinstance(host, str) or not host or isinstance(port, bool)
                or not isinstance(port, int) or not 1 <= port <= 65535
                or not isinstance(cert, str | None) or not isinstance(status, str | None)):
            raise ValueError("bad field")
        return RelayRecord(
            host=host,
            port=port,
            cert_file=Path(cert) if cert is not None else None,
            listening=tuple(str(a) for a in doc.get("listening") or ()),
            status_socket=Path(status) if status is not None else None,
            pid=int(doc.get("pid") or 0),
            started=float(doc.get("started") or 0.0),
            domain=str(doc.get("domain") or ""),
            acme=doc.get("acme") is True,
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ConfigError(
            f"{path} is not a relay record (host, port, cert): delete it; the relay writes it "
            "again at its next start"
        ) from None


def own_address(
    store: Store, tls: TLSConfig | None, *, host: str | None = None, port: int | None = None,
    public_hosts: list[str] | tuple[str, ...] = (),
) -> RelayAddress:
    """What a relay about to start tells hidden servers about itself (``serve``): ``host``,
    else the first of ``public_hosts``, else the first public name in its certificate, else
    this machine's FQDN; ``port`` (None: the port it binds); its certificate when self-signed."""
    cert_file = tls.cert_file if tls is not None else store.data_dir / CERT_FILE
    name = host or (public_hosts[0] if public_hosts else None) or default_server_host(cert_file)
    ca = self_signed_pem(tls.cert_file) if tls is not None else None
    return RelayAddress(host=name, port=port, ca_pem=ca)


@dataclass(frozen=True, slots=True)
class PublicAddress:
    """The relay address for new provisioning files, and a line on where each part came from."""

    relay: RelayAddress
    facts: str  # e.g. "server relay.example.com:8899 (relay.json), CA data/cert.pem (self-signed)"
    warning: str | None = None  # for the operator, e.g. a host that reaches only this machine


def public_address(
    store: Store,
    *,
    host: str | None = None,
    port: int | None = None,
    ca_file: Path | None = None,
    no_ca: bool = False,
    previous: Provisioning | None = None,
    entry: Entry | None = None,
) -> PublicAddress:
    """Work out where hidden servers given a new file reach the relay.

    Each part, in order: what the operator gave (``host``, ``port``, ``ca_file``/``no_ca``);
    then what the operator gave for this ``entry`` before (its ``server_host``/``server_port``:
    ``users rotate`` keeps them, whatever file it writes); then the file being replaced
    (``previous``); then the record of the relay that serves this data folder
    (DATA_DIR/relay.json); then, before the relay's first start, the defaults the relay will
    use: DEFAULT_PORT and the self-signed certificate in the data folder — created now, the way
    the relay would, so the file carries its CA.
    """
    record = recall_relay(store.data_dir)
    explicit_host = host
    sources: list[str] = []  # where the parts not given came from
    if entry is not None:
        recorded = [name for name, given, own in (("host", host, entry.server_host),
                                                  ("port", port, entry.server_port))
                    if own and not given]
        if recorded:
            sources.append(f"{' and '.join(recorded)} as recorded for the entry")
        host, port = host or entry.server_host or None, port or entry.server_port or None
        explicit_host = explicit_host or entry.server_host or None
    missing = " and ".join(name for name, value in (("host", host), ("port", port)) if not value)
    if missing:
        if previous is not None:
            host, port = host or previous.host, port or previous.port
            sources.append(f"{missing} as in the file it replaces")
        elif record is not None:
            host, port = host or record.host, port or record.port
            sources.append(f"{missing} from {store.data_dir / RELAY_RECORD}")
        else:
            sources.append(f"{missing} by default: no relay has started with this data folder "
                           "yet")
    where = "; ".join(sources) or "as given"
    given_host = host

    ca: str | None
    if no_ca:
        ca, ca_origin = None, "none"
    elif ca_file is not None:
        ca, ca_origin = read_cert_pem(ca_file), str(ca_file)
    elif (previous is not None and (record is None
                                    or (previous.host, previous.port) != (record.host,
                                                                          record.port))):
        # A file for another relay (say, another node's address) keeps the CA it had.
        ca, ca_origin = previous.ca_pem, "as in the file it replaces"
    elif record is not None:
        relay, ca_origin = record.address()
        ca = relay.ca_pem
    else:
        cert_file = store.data_dir / CERT_FILE
        created = not cert_file.exists()
        names = [given_host] if given_host and not is_loopback_host(given_host) else []
        tls = ensure_self_signed(store.data_dir, names)  # as `serve` will, on its first start
        ca = self_signed_pem(tls.cert_file)
        made = ", made now: the relay will present it" if created else ""
        ca_origin = f"{cert_file} (self-signed{made})" if ca is not None else "none"
    if host is None:
        host = default_server_host(store.data_dir / CERT_FILE)
    port = port or DEFAULT_PORT
    warning = None
    if is_loopback_host(host):
        warning = (f"server host {host!r} reaches only this machine: a hidden server elsewhere "
                   "needs the relay's public name or address instead")
        if explicit_host is None:
            warning += (" (--server-host NAME here, or start the relay with --public-host NAME "
                        "and its files use it)")
    facts = f"server {_host_port(host, port)} ({where}), CA {ca_origin}"
    return PublicAddress(RelayAddress(host, port, ca), facts, warning)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

