"""Provisioning files: what a hidden server needs to park at the relay (docs/protocol.md §5).

The file holds the hidden server's TOTP secret, so it is written readable by its owner only.
Shape (field names fixed; readers ignore fields they do not know)::

    {"uuid": "...", "label": "...",
     "server": {"host": "...", "port": 8899, "ca": "-----BEGIN CERTIFICATE-----..."},
     "authParams": {"base32": "...", "step": 30, "digits": 6},
     "proxyProtocol": 2}

``proxyProtocol`` (ours, optional) tells the agent to ask the relay for a PROXY header of that
version in front of each pairing, for a local service that speaks the PROXY protocol.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rendezvous.errors import ProvisioningError, RendezvousError
from rendezvous.protocol.totp import MAX_DIGITS as MAX_DIGITS  # for the CLI and admin
from rendezvous.protocol.totp import MIN_DIGITS as MIN_DIGITS  # for the CLI and admin
from rendezvous.registry.base import DEFAULT_DIGITS, DEFAULT_STEP, Entry
from rendezvous.tls import (
    CERT_FILE,
    cert_names,
    default_names,
    is_self_signed,
    read_cert_pem,
    write_private,
)


@dataclass(frozen=True, slots=True)
class Provisioning:
    """A provisioning file, read and checked: where to park and how to make the token."""

    uuid: str
    label: str
    host: str
    port: int
    ca_pem: str | None  # None: the relay's certificate chains to a public CA
    base32: str
    step: int
    digits: int
    proxy_protocol: int = 0  # 1 or 2: ask for a PROXY header per pairing (&proxy=N); 0: none


def provisioning_document(entry: Entry, host: str, port: int, ca_pem: str | None) -> dict[str, Any]:
    """The §5 JSON document for ``entry`` on the relay at ``host``:``port``, unless the entry
    has a relay address of its own (``server_host``, ``server_port``: its files always say it).

    ``ca_pem`` is the PEM the hidden server must trust for the relay; None leaves ``server.ca``
    out (the relay's certificate chains to a public CA).
    """
    server: dict[str, Any] = {"host": entry.server_host or host,
                              "port": entry.server_port or port}
    if ca_pem is not None:
        server["ca"] = ca_pem
    return {
        "uuid": entry.uuid,
        "label": entry.label,
        "server": server,
        "authParams": {"base32": entry.base32, "step": entry.step, "digits": entry.digits},
        **({"proxyProtocol": entry.proxy_protocol} if entry.proxy_protocol else {}),
    }


def write_provisioning(doc: dict[str, Any], path: Path | str) -> None:
    """Write ``doc`` as JSON to ``path``, mode 0600, replacing any file there atomically.

    Missing parent folders are created (mode 0700). Raises ProvisioningError when the file
    cannot be written.
    """
    try:
        write_private_json(doc, path)
    except OSError as exc:
        raise ProvisioningError(
            f"cannot write provisioning file {path}: {exc.strerror or exc}"
        ) from exc


def write_private_json(doc: dict[str, Any], path: Path | str) -> None:
    """Write ``doc`` as JSON to ``path``, mode 0600, replacing any file there atomically;
    missing parent folders are made (mode 0700). Raises OSError."""
    target = Path(path)
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(target, data)


def load_provisioning(path: Path | str) -> Provisioning:
    """Read and check the provisioning file at ``path``.

    Required: ``uuid``, ``server.host``, ``server.port``, ``authParams.base32``. Optional:
    ``label`` (""), ``server.ca`` (None), ``authParams.step`` (30), ``authParams.digits`` (6),
    ``proxyProtocol`` (0: none; else 1 or 2).
    Raises ProvisioningError naming the file and the first problem found.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ProvisioningError(f"cannot read provisioning file {path}: {reason}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ProvisioningError(f"provisioning file {path} is not valid JSON: {exc}") from exc
    try:
        return parse_provisioning(doc)
    except ProvisioningError as exc:
        raise ProvisioningError(f"provisioning file {path}: {exc}") from None


def parse_provisioning(doc: Any) -> Provisioning:
    """Check a decoded §5 document (see :func:`load_provisioning`) and return its facts."""
    top = _object(doc, "the document")
    server = _object(_field(top, "server", "server"), "server")
    auth = _object(_field(top, "authParams", "authParams"), "authParams")

    uuid = _string(_field(top, "uuid", "uuid"), "uuid")
    host = _string(_field(server, "host", "server.host"), "server.host")
    port = _integer(_field(server, "port", "server.port"), "server.port", 1, 65535)
    base32 = _string(_field(auth, "base32", "authParams.base32"), "authParams.base32")
    _check_base32(base32)

    label = top.get("label", "")
    if not isinstance(label, str):
        raise ProvisioningError("label must be a string")
    ca = server.get("ca")
    if ca is not None and (not isinstance(ca, str) or "-----BEGIN CERTIFICATE-----" not in ca):
        raise ProvisioningError("server.ca must be a PEM certificate")
    step = _integer(auth.get("step", DEFAULT_STEP), "authParams.step", 1, 24 * 3600)
    digits = _integer(
        auth.get("digits", DEFAULT_DIGITS), "authParams.digits", MIN_DIGITS, MAX_DIGITS
    )
    # A version this agent cannot ask for is an error, not a silent "none": the local service
    # would then get requests without the header it expects.
    proxy = top.get("proxyProtocol")
    proxy = 0 if proxy is None else _integer(proxy, "proxyProtocol", 0, 2)
    return Provisioning(
        uuid=uuid,
        label=label,
        host=host,
        port=port,
        ca_pem=ca,
        base32=base32,
        step=step,
        digits=digits,
        proxy_protocol=proxy,
    )


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProvisioningError(f"{where} must be a JSON object")
    return value


def _field(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj or obj[key] is None:
        raise ProvisioningError(f"missing field {where}")
    return obj[key]


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ProvisioningError(f"{where} must be a non-empty string")
    return value


def _integer(value: Any, where: str, low: int, high: int) -> int:
    # bool is an int in Python, but `"port": true` is a broken file, not port 1.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProvisioningError(f"{where} must be an integer from {low} to {high}, not {value!r}")
    return value


def _check_base32(secret: str) -> None:
    padded = secret + "=" * (-len(secret) % 8)
    try:
        base64.b32decode(padded, casefold=True)
    except (binascii.Error, ValueError):
        raise ProvisioningError("authParams.base32 is not a base32 secret") from None


# Where the relay is, as a provisioning file says it (shared by `users add` and the admin page) --


def default_server_host(cert_file: Path) -> str:
    """The host name hidden servers should use: the first name in ``cert_file`` that
    ``ensure_self_signed`` did not add by itself.

    Those are the --public-host names given to ``serve`` (or a public certificate's names), the
    ones clients use; without any, this machine's fully qualified name.
    """
    automatic = {name.lower() for name in default_names()}
    with contextlib.suppress(OSError, RendezvousError):
        for name in cert_names(cert_file.read_bytes()):
            if name.lower() not in automatic:
                return name
    return socket.getfqdn()


def self_signed_pem(cert_file: Path) -> str | None:
    """The certificate PEM of ``cert_file`` when it is self-signed (hidden servers must then
    trust exactly it), else None (it chains to a CA they already trust, or is missing)."""
    if cert_file.is_file() and is_self_signed(cert_file.read_bytes()):
        return read_cert_pem(cert_file)
    return None


def relay_ca(
    data_dir: Path, ca_file: Path | None = None, *, no_ca: bool = False
) -> tuple[str | None, str]:
    """The PEM for ``server.ca`` and a few words on where it came from.

    ``ca_file`` wins; else DATA_DIR/cert.pem when it is self-signed; else none.
    """
    if no_ca:
        return None, "none"
    if ca_file is not None:
        return read_cert_pem(ca_file), str(ca_file)
    own = data_dir / CERT_FILE
    pem = self_signed_pem(own)
    if pem is not None:
        return pem, f"{own} (self-signed)"
    return None, "none (the relay's certificate must chain to a public CA)"
