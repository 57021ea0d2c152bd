"""Self-signed certificates, the server SSLContext, and a real handshake that verifies them."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rendezvous.config import TLSConfig
from rendezvous.errors import ConfigError
from rendezvous.tls import (
    cert_names,
    default_names,
    ensure_self_signed,
    generate_self_signed,
    is_self_signed,
    read_cert_pem,
    server_ssl_context,
)

HANDSHAKE_TIMEOUT = 10.0


def make_pair(folder: Path, names: list[str]) -> TLSConfig:
    cert, key = folder / "cert.pem", folder / "key.pem"
    generate_self_signed(names, cert, key)
    return TLSConfig(cert_file=cert, key_file=key)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def handshake(tls: TLSConfig, server_hostname: str, *, strict: bool = True) -> None:
    """A real TLS handshake over a socket pair; the client trusts only ``tls``'s certificate."""
    server_ctx = server_ssl_context(tls)
    client_ctx = ssl.create_default_context(cafile=str(tls.cert_file))
    if strict:
        # Python 3.13 turns this on by default: the certificate must pass RFC 5280 checks.
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    left, right = socket.socketpair()
    left.settimeout(HANDSHAKE_TIMEOUT)
    right.settimeout(HANDSHAKE_TIMEOUT)
    server_error: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(right, server_side=True) as conn:
                conn.sendall(conn.recv(5))
        except (OSError, ssl.SSLError) as exc:
            server_error.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(left, server_hostname=server_hostname) as conn:
            conn.sendall(b"hello")
            assert conn.recv(5) == b"hello"
            assert conn.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        left.close()
        thread.join(HANDSHAKE_TIMEOUT)
        right.close()
    assert not thread.is_alive()
    assert server_error == []


def test_generated_certificate_has_the_names_and_extensions(tmp_path: Path) -> None:
    tls = make_pair(tmp_path, ["relay.example.com", "127.0.0.1", "::1", "localhost"])
    cert = load(tls.cert_file)

    assert cert_names(tls.cert_file.read_bytes()) == [
        "relay.example.com",
        "localhost",
        "127.0.0.1",
        "::1",
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["relay.example.com"]
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"

    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    assert is_self_signed(tls.cert_file.read_bytes())
    assert stat.S_IMODE(tls.key_file.stat().st_mode) == 0o600
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=825) <= lifetime <= datetime.timedelta(days=826)


def test_names_are_deduplicated_and_normalised(tmp_path: Path) -> None:
    tls = make_pair(tmp_path, ["Bücher.example", "[::1]", "bücher.example", "0:0::1"])
    assert cert_names(tls.cert_file.read_bytes()) == ["xn--bcher-kva.example", "::1"]


@pytest.mark.parametrize(
    "names", [[], [""], ["  "], ["two words"], ["bad..dots"], ["a/b"], ["x" * 64 + ".example"]]
)
def test_no_usable_name_is_refused(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(ConfigError):
        generate_self_signed(names, tmp_path / "c.pem", tmp_path / "k.pem")
    assert not (tmp_path / "k.pem").exists()


def test_server_context_is_tls12_or_later(tmp_path: Path) -> None:
    ctx = server_ssl_context(make_pair(tmp_path, ["localhost"]))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.protocol == ssl.PROTOCOL_TLS_SERVER


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost", "::1"])
def test_handshake_verifies_each_name(tmp_path: Path, hostname: str) -> None:
    tls = make_pair(tmp_path, ["localhost", "127.0.0.1", "::1"])
    handshake(tls, hostname)


def test_handshake_rejects_a_name_not_in_the_certificate(tmp_path: Path) -> None:
    tls = make_pair(tmp_path, ["localhost", "127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        handshake(tls, "elsewhere.example")


def test_handshake_rejects_another_certificate(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    served = make_pair(tmp_path / "a", ["localhost"])
    trusted = make_pair(tmp_path / "b", ["localhost"])
    # The client trusts b's certificate while the server presents a's.
    server_ctx = server_ssl_context(served)
    client_ctx = ssl.create_default_context(cafile=str(trusted.cert_file))
    left, right = socket.socketpair()
    left.settimeout(HANDSHAKE_TIMEOUT)
    right.settimeout(HANDSHAKE_TIMEOUT)

    def serve() -> None:
        # The client aborts the handshake: an error here is expected.
        with contextlib.suppress(OSError, ssl.SSLError):
            server_ctx.wrap_socket(right, server_side=True).close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            client_ctx.wrap_socket(left, server_hostname="localhost")
    finally:
        left.close()
        thread.join(HANDSHAKE_TIMEOUT)
        right.close()


def test_server_context_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_pair(tmp_path / "a", ["localhost"])
    b = make_pair(tmp_path / "b", ["localhost"])

    with pytest.raises(ConfigError, match="certificate file not found"):
        server_ssl_context(TLSConfig(cert_file=tmp_path / "nope.pem", key_file=a.key_file))
    with pytest.raises(ConfigError, match="key file not found"):
        server_ssl_context(TLSConfig(cert_file=a.cert_file, key_file=tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match="cannot use certificate"):
        server_ssl_context(TLSConfig(cert_file=a.cert_file, key_file=b.key_file))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigError, match="cannot use certificate"):
        server_ssl_context(TLSConfig(cert_file=a.cert_file, key_file=garbage))


def test_ensure_self_signed_creates_once_then_reuses(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "deeper"
    tls = ensure_self_signed(data_dir, ["relay.example.com"])
    assert tls == TLSConfig(cert_file=data_dir / "cert.pem", key_file=data_dir / "key.pem")
    names = cert_names(tls.cert_file.read_bytes())
    for name in [*default_names(), "relay.example.com"]:
        assert name.lower() in names
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    handshake(tls, "127.0.0.1")
    handshake(tls, "relay.example.com")

    first = tls.cert_file.read_bytes()
    warnings: list[str] = []
    again = ensure_self_signed(data_dir, ["relay.example.com"], warn=warnings.append)
    assert again == tls
    assert tls.cert_file.read_bytes() == first
    assert warnings == []


def test_ensure_self_signed_warns_about_a_missing_name(tmp_path: Path) -> None:
    tls = ensure_self_signed(tmp_path, [])
    before = tls.cert_file.read_bytes()
    warnings: list[str] = []
    ensure_self_signed(tmp_path, ["new.example.com", "localhost"], warn=warnings.append)
    assert tls.cert_file.read_bytes() == before  # not replaced behind the hidden servers' back
    assert len(warnings) == 1
    assert "new.example.com" in warnings[0]
    assert "localhost" not in warnings[0]


def test_ensure_self_signed_refuses_half_a_pair(tmp_path: Path) -> None:
    tls = ensure_self_signed(tmp_path, [])
    tls.key_file.unlink()
    cert = tls.cert_file.read_bytes()
    with pytest.raises(ConfigError, match=r"key\.pem does not"):
        ensure_self_signed(tmp_path, [])
    assert tls.cert_file.read_bytes() == cert
    assert not tls.key_file.exists()


def test_is_self_signed_is_false_for_an_issued_certificate(tmp_path: Path) -> None:
    ca = make_pair(tmp_path, ["test-ca.example"])
    ca_cert = load(ca.cert_file)
    ca_key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf.example")]))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
    assert not is_self_signed(leaf_pem)
    assert is_self_signed(ca.cert_file.read_bytes())
    with pytest.raises(ConfigError):
        is_self_signed(b"not a certificate")


def test_read_cert_pem_keeps_certificates_only(tmp_path: Path) -> None:
    tls = make_pair(tmp_path, ["localhost"])
    combined = tmp_path / "combined.pem"
    combined.write_bytes(tls.key_file.read_bytes() + tls.cert_file.read_bytes())
    pem = read_cert_pem(combined)
    assert pem == tls.cert_file.read_text()
    assert "PRIVATE KEY" not in pem

    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        read_cert_pem(tls.key_file)
    with pytest.raises(ConfigError, match="cannot read"):
        read_cert_pem(tmp_path / "missing.pem")
