"""A wildcard certificate for the test domain, and a relay thread serving named hosts."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import ServerThread

from rendezvous.config import Limits, ServerConfig, TLSConfig

DOMAIN = "relay.test"


def wildcard_certificate(folder: Path, domain: str = DOMAIN) -> TLSConfig:
    """A self-signed certificate for ``*.domain``, ``domain`` and 127.0.0.1, as an operator
    would supply with --cert/--key (the hidden servers' harness reaches 127.0.0.1)."""
    cert_file, key_file = folder / "wildcard.pem", folder / "wildcard.key"
    if cert_file.exists():
        return TLSConfig(cert_file=cert_file, key_file=key_file)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(f"*.{domain}"), x509.DNSName(domain),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return TLSConfig(cert_file=cert_file, key_file=key_file)


@contextmanager
def named_relay(tmp_path: Path, **limits: Any) -> Iterator[ServerThread]:
    """A relay on a free port with --domain relay.test and the wildcard certificate."""
    config = ServerConfig(host="127.0.0.1", port=0, tls=wildcard_certificate(tmp_path),
                          registry_url="memory://", limits=replace(Limits(), **limits),
                          domain=DOMAIN)
    thread = ServerThread(config)
    try:
        yield thread
    finally:
        thread.stop()
