"""``rendezvous cert``: make a self-signed certificate."""

from __future__ import annotations

import argparse
from pathlib import Path

from rendezvous.cli.options import Commands, Formatter, int_in
from rendezvous.errors import ConfigError
from rendezvous.tls import CERT_FILE, DEFAULT_DAYS, KEY_FILE, cert_names, generate_self_signed


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Add ``cert`` to ``commands``."""
    p = commands.add_parser(
        "cert",
        formatter_class=Formatter,
        help="make a self-signed certificate",
        description="Write a self-signed certificate (ECDSA P-256) and its key as cert.pem and\n"
        "key.pem (mode 0600), e.g. for 'serve --cert DIR/cert.pem --key DIR/key.pem'.",
    )
    p.add_argument(
        "--host",
        dest="hosts",
        metavar="NAME_OR_IP",
        action="append",
        required=True,
        help="a DNS name or IP address the certificate covers; repeatable, the first is its CN",
    )
    p.add_argument("--out-dir", metavar="DIR", type=Path, required=True, help="folder to write to")
    p.add_argument(
        "--days",
        type=int_in(1),
        default=DEFAULT_DAYS,
        help="validity in days (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace cert.pem and key.pem if present")
    p.set_defaults(handler=_cert)


def _cert(args: argparse.Namespace) -> int:
    out_dir: Path = args.out_dir
    cert, key = out_dir / CERT_FILE, out_dir / KEY_FILE
    if not args.force:
        for path in (cert, key):
            if path.exists():
                raise ConfigError(f"{path} exists: pass --force to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    generate_self_signed(args.hosts, cert, key, days=args.days)
    print(f"certificate: {cert}")
    print(f"key:         {key} (mode 0600)")
    print(f"names:       {', '.join(cert_names(cert.read_bytes()))}")
    print(f"valid for:   {args.days} days")
    return 0
