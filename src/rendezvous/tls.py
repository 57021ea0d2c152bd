"""Certificates: a self-signed one for a relay without a public CA, and the server's SSLContext.

The self-signed certificate doubles as its own trust anchor: provisioning files carry its PEM, and
hidden servers trust exactly that. Its extensions follow RFC 5280 closely enough that OpenSSL's
strict verification (the default since Python 3.13) accepts it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rendezvous.config import TLSConfig
from rendezvous.errors import ConfigError

logger = logging.getLogger(__name__)

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
# 825 days: the longest validity Apple platforms accept for a server certificate.
DEFAULT_DAYS = 825
# Backdate the start a little so a peer whose clock runs behind still accepts a fresh certificate.
_BACKDATE = datetime.timedelta(hours=1)
# X.509 caps the common name at 64 characters; a longer first name is still in the SANs.
_MAX_CN = 64

# RFC 1035 sizes; "_" and a leading "*" label (a wildcard) occur in real certificates too.
_MAX_DNS = 253
_LABEL = re.compile(r"\*|[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_name(name: str) -> str | IPAddress:
    """A SAN value: an IP address, or a DNS name in ASCII (IDNA) form."""
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]  # "[::1]", as IPv6 hosts are written in URLs
    if not text:
        raise ConfigError("empty host name for a certificate")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        dns = text.lower() if text.isascii() else text.encode("idna").decode("ascii")
    except UnicodeError:
        dns = ""
    dns = dns.removesuffix(".")
    if len(dns) > _MAX_DNS or not all(_LABEL.fullmatch(label) for label in dns.split(".")):
        raise ConfigError(f"invalid host name for a certificate: {name!r}")
    return dns


def generate_self_signed(
    names: list[str], cert_path: Path | str, key_path: Path | str, days: int = DEFAULT_DAYS
) -> None:
    """Write a self-signed ECDSA P-256 certificate for ``names`` and its key, both PEM.

    Each name becomes a SAN (an IP address or a DNS name); the first is also the common name.
    The certificate is its own CA (``CA:TRUE``), so a peer can trust it directly. The key file
    is created with mode 0600. Raises ConfigError for no names, a bad name or bad ``days``.
    """
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, not {days}")
    sans = list(dict.fromkeys(_parse_name(n) for n in names))  # dedupe, keep order
    if not sans:
        raise ConfigError("a certificate needs at least one host name or IP address")

    key = ec.generate_private_key(ec.SECP256R1())
    cn = str(sans[0])
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rendezvous"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn if len(cn) <= _MAX_CN else "rendezvous"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    general_names: list[x509.GeneralName] = [
        x509.DNSName(n) if isinstance(n, str) else x509.IPAddress(n) for n in sans
    ]
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_private(Path(key_path), key_pem)
        Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise ConfigError(
            f"cannot write {exc.filename or key_path}: {exc.strerror or exc}"
        ) from exc


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, readable by the owner only from the first byte, replacing any
    file there atomically (keys, account data, provisioning files)."""
    # mkstemp creates the file 0600 (never world-readable, not even for a moment); the rename
    # swaps it in whole, so neither a reader nor a crash sees half a secret, and an old file's
    # wider mode is not inherited.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_names() -> list[str]:
    """The names every self-signed certificate of ``ensure_self_signed`` covers."""
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    # A host name that is not a valid DNS name would only make the certificate impossible.
    with contextlib.suppress(ConfigError):
        _parse_name(host)
        names.append(host)
    return names


def cert_names(cert_pem: bytes) -> list[str]:
    """The subject alternative names (DNS names and IP addresses) of a PEM certificate."""
    cert = _load_first(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    return [*dns, *(str(ip) for ip in ips)]


def missing_names(cert_pem: bytes, names: Iterable[str]) -> list[str]:
    """Those of ``names`` the certificate's SANs do not cover (exact match, no wildcards)."""
    have = {_parse_name(n) for n in cert_names(cert_pem)}
    return [n for n in names if _parse_name(n) not in have]


def ensure_self_signed(
    data_dir: Path,
    extra_names: list[str],
    warn: Callable[[str], None] | None = None,
) -> TLSConfig:
    """The TLS files in ``data_dir``, creating a self-signed pair on first use.

    A new certificate covers localhost, 127.0.0.1, ::1, this host's name and ``extra_names``
    (the public host names clients use). An existing pair is reused as is: if it lacks one of
    ``extra_names``, ``warn`` (default: a logged warning) is told so, rather than the certificate
    being replaced behind the back of hidden servers that trust it.
    """
    cert_path = data_dir / CERT_FILE
    key_path = data_dir / KEY_FILE
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert and have_key:
        missing = missing_names(_read_bytes(cert_path, "certificate"), extra_names)
        if missing:
            (warn or logger.warning)(
                f"{cert_path} does not cover {', '.join(missing)}; clients connecting by that "
                f"name will reject it (delete {cert_path} and {key_path} to make a new one, "
                "then re-provision every hidden server)"
            )
        return TLSConfig(cert_file=cert_path, key_file=key_path)
    if have_cert or have_key:
        # Replacing half a pair would destroy a key or certificate someone may still need.
        present, absent = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise ConfigError(f"{present} exists but {absent} does not: restore it or remove both")
    try:
        # 0700: the folder holds the private key and, by default, the registry of secrets.
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data folder {data_dir}: {exc.strerror or exc}") from exc
    generate_self_signed([*default_names(), *extra_names], cert_path, key_path)
    return TLSConfig(cert_file=cert_path, key_file=key_path)


TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """A server-side SSLContext (TLS 1.2 or later) presenting ``tls``'s certificate and key.

    Raises ConfigError naming the file when one is missing or unreadable, or when the key does
    not match the certificate.
    """
    for path, what in ((tls.cert_file, "certificate"), (tls.key_file, "key")):
        if not Path(path).is_file():
            raise ConfigError(f"{what} file not found: {path}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 with forward secrecy and AEAD only: no CBC (Lucky13-style padding oracles), no
    # static RSA. (TLS 1.3's suites are all AEAD and not affected by this.)
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"cannot use certificate {tls.cert_file} with key {tls.key_file}: {exc.reason or exc}"
            " (is the key the one for this certificate, both PEM?)"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {tls.cert_file} or {tls.key_file}: {exc}") from exc
    return ctx


def _read_bytes(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc


def _load_all(cert_pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ConfigError("not a PEM certificate") from exc
    if not certs:
        raise ConfigError("not a PEM certificate")
    return certs


def _load_first(cert_pem: bytes) -> x509.Certificate:
    return _load_all(cert_pem)[0]


def is_self_signed(cert_pem: bytes) -> bool:
    """Whether the (first) certificate in ``cert_pem`` is signed by its own key.

    Raises ConfigError when ``cert_pem`` holds no PEM certificate.
    """
    cert = _load_first(cert_pem)
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def read_cert_pem(path: Path | str) -> str:
    """The certificates in the PEM file at ``path``, re-encoded, and nothing else.

    Re-encoding drops whatever else the file holds — above all a private key, should ``path`` be
    a combined cert+key file — so the result is safe to hand out. Raises ConfigError when the
    file is unreadable or holds no certificate.
    """
    data = _read_bytes(path, "certificate")
    try:
        certs = _load_all(data)
    except ConfigError:
        raise ConfigError(f"{path} holds no PEM certificate") from None
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


def client_ssl_context(ca_pem: str | None) -> ssl.SSLContext:
    """A client SSLContext for reaching a rendezvous server.

    With no ``ca_pem``, the system's trust store and normal hostname checks. With a CA's PEM,
    only that CA is trusted. When ``ca_pem`` is the server's own self-signed certificate it is
    *pinned*: exactly that certificate verifies, whatever address the server is reached by, so
    the hostname check is skipped (the pin is stronger than a name match).
    """
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem is None:
        return context
    context = ssl.create_default_context(cadata=ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if is_self_signed(ca_pem.encode("ascii")):
        context.check_hostname = False  # verify_mode stays CERT_REQUIRED: the pin is checked
    return context
