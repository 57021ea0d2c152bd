"""``rendezvous open`` and ``get``: the mobile side, reaching a hidden server through the relay.

The agent's modules are imported inside the handlers, so the relay's own commands do not load
httpx.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from rendezvous.cli.options import (
    EXIT_ERROR,
    Commands,
    Formatter,
    err,
    host_port,
    relay_host_port,
    runtime_options,
    seconds,
)
from rendezvous.config import (
    DEFAULT_LISTEN,
    DEFAULT_PORT,
    DEFAULT_VISITOR_PASSWORD,
    ENV_VISITOR_PASSWORD,
    TunnelConfig,
)
from rendezvous.errors import ConfigError
from rendezvous.tls import read_cert_pem

_OPEN_EPILOG = """\
examples:
  rendezvous open 2f402f80-da50-11e1-9b23-000000000001 \\
      --server relay.example.com:8899 --ca relay-cert.pem
      then: curl http://127.0.0.1:8080/status, or open the address in a browser
  rendezvous open ID --config hub.json --listen 127.0.0.1:9000 --auth digest
  rendezvous open ID --config hub.json --visitor-password PASSWORD

Each connection to the local address becomes one pairing with the hidden server. Its first
request gets the credentials that name ID (an Authorization header of its own is dropped);
later requests on the same connection reach the same hidden server unchanged. When the relay
cannot be reached the local client gets 502 with the reason; when no hidden server is parked,
the relay's 404 "UUID not registered".

exit status: 0 after Ctrl-C or SIGTERM; 2 when the command line is wrong or the local
address cannot be listened on."""

_GET_EPILOG = """\
examples:
  rendezvous get 2f402f80-da50-11e1-9b23-000000000001 /status \\
      --server relay.example.com:8899 --ca relay-cert.pem
  rendezvous get ID /upload --config hub.json -d @photo.jpg -H 'Content-Type: image/jpeg'
  rendezvous get ID /backup.tar --config hub.json -o backup.tar --timeout 600

exit status: 0 for a 1xx, 2xx or 3xx answer; 1 for an HTTP error status (the relay's own,
e.g. "404 UUID not registered", is printed to stderr); 2 when the relay cannot be reached
(connection, TLS, timeout) or the command line is wrong."""


def _relay_options(default_auth: str) -> argparse.ArgumentParser:
    """The hidden server's ID, how to reach the relay and how to log in, for ``open``/``get``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("uuid", metavar="ID", help="the hidden server's ID")
    group = common.add_argument_group("relay")
    group.add_argument(
        "--server",
        type=relay_host_port(),
        metavar="HOST[:PORT]",
        help=f"the relay (port default: {DEFAULT_PORT}); required without --config",
    )
    group.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="PEM certificate to trust for the relay: its self-signed certificate or its CA "
        "(default: the system's trust store, or server.ca of --config)",
    )
    group.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a provisioning file (from 'rendezvous users add') to take the relay's host, "
        "port and certificate from; --server and --ca override it",
    )
    login = common.add_argument_group("visitor")
    login.add_argument(
        "--auth",
        choices=("basic", "digest"),
        default=default_auth,
        help="how to name ID to the relay: Basic (one round trip) or Digest, answering the "
        "relay's challenge (default: %(default)s)",
    )
    login.add_argument(
        "--visitor-password",
        metavar="PASSWORD",
        help="the password of a hidden server that checks its visitors ('users visitor'); "
        f"works with Basic and Digest (default: ${ENV_VISITOR_PASSWORD}, which keeps it out of "
        f"the process list, else {DEFAULT_VISITOR_PASSWORD!r}: any password does when visitors "
        "are not checked)",
    )
    return common


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Add ``open`` and ``get`` to ``commands``."""
    p = commands.add_parser(
        "open",
        parents=[_relay_options("basic"), runtime_options()],
        formatter_class=Formatter,
        help="reach a hidden server from a local address, like ssh -L",
        description="Listen on a local address and send every connection made to it through\n"
        "the relay to hidden server ID, so any HTTP client or browser reaches it\n"
        "without credentials.",
        epilog=_OPEN_EPILOG,
    )
    p.add_argument(
        "--listen",
        type=host_port(DEFAULT_LISTEN[0], None),
        default=DEFAULT_LISTEN,
        metavar="[HOST:]PORT",
        help=f"local address to listen on; port 0 picks a free one (default: "
        f"{DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]})",
    )
    p.set_defaults(handler=_open)

    p = commands.add_parser(
        "get",
        parents=[_relay_options("digest")],
        formatter_class=Formatter,
        help="fetch one URL from a hidden server, like curl",
        description="Send one request to hidden server ID through the relay and write the\n"
        "response body to stdout (or --output).",
        epilog=_GET_EPILOG,
    )
    p.add_argument("path", metavar="PATH", help="the path (and query) to fetch, e.g. /status")
    p.add_argument("-X", "--request", metavar="METHOD", help="method (default: GET, POST with -d)")
    p.add_argument(
        "-d",
        "--data",
        metavar="DATA",
        help="request body: text, @FILE for a file's bytes, @- for stdin",
    )
    p.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an extra request header; repeatable",
    )
    p.add_argument("-i", "--include", action="store_true", help="write the response head first")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the body to FILE")
    p.add_argument("-L", "--location", action="store_true", help="follow redirects")
    p.add_argument(
        "--timeout",
        type=seconds(allow_zero=False),
        default=30.0,
        metavar="SECONDS",
        help="limit on connecting and on each wait for data (default: %(default)s)",
    )
    p.set_defaults(handler=_get)


def _tunnel_config(args: argparse.Namespace) -> TunnelConfig:
    """The ID, the relay's address, the PEM to trust for it and the credentials, from the
    flags and --config."""
    import ssl

    from rendezvous.protocol.ids import valid_id
    from rendezvous.provisioning import load_provisioning
    from rendezvous.tls import client_ssl_context

    uuid: str = args.uuid
    if not valid_id(uuid):
        raise ConfigError(f"invalid ID {uuid!r}: no spaces or control characters")
    if args.auth == "basic" and ":" in uuid:
        raise ConfigError(f"ID {uuid!r} holds ':', which Basic credentials cannot carry: "
                          "pass --auth digest")
    password: str | None = args.visitor_password
    if password is None:
        password = os.environ.get(ENV_VISITOR_PASSWORD) or None
    if password is not None and (not password or any(c in password for c in "\r\n")):
        raise ConfigError("the visitor password must be one line, not empty")
    config: Path | None = args.config
    ca: Path | None = args.ca
    provisioning = load_provisioning(config) if config is not None else None
    server: tuple[str, int] | None = args.server
    if server is None and provisioning is not None:
        server = (provisioning.host, provisioning.port)
    if server is None:
        raise ConfigError("which relay? pass --server HOST:PORT (or --config FILE)")
    ca_pem = read_cert_pem(ca) if ca is not None else None
    if ca_pem is None and provisioning is not None:
        ca_pem = provisioning.ca_pem
    try:
        client_ssl_context(ca_pem)
    except ssl.SSLError as exc:
        raise ConfigError(f"unusable certificate for the relay: {exc.reason or exc}") from exc
    return TunnelConfig(
        uuid=uuid, server=server, ca_pem=ca_pem, listen=getattr(args, "listen", DEFAULT_LISTEN),
        auth=args.auth, password=password or DEFAULT_VISITOR_PASSWORD,
        log_format=getattr(args, "log_format", "text"),
        use_uvloop=not getattr(args, "no_uvloop", False),
    )


def _open(args: argparse.Namespace) -> int:
    config = _tunnel_config(args)
    from rendezvous import logs, runtime
    from rendezvous.agent.mobile import Tunnel, serve_until_signalled

    logs.configure_logging(config.log_format)
    tunnel = Tunnel(config.uuid, config.server, ca_pem=config.ca_pem, listen=config.listen,
                    auth="digest" if config.auth == "digest" else "basic",
                    password=config.password)

    def ready(started: Tunnel) -> None:
        print(f"open {started.url} to reach {config.uuid} through {started.relay}", flush=True)

    host, port = config.listen
    try:
        runtime.run(serve_until_signalled(tunnel, ready), use_uvloop=config.use_uvloop)
    except OSError as exc:
        # errno's text, not asyncio's "error while attempting to bind on address (...)".
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or exc
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from exc
    return 0


def _request_body(data: str | None) -> bytes | None:
    if data is None:
        return None
    if data == "@-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {data[1:]}: {exc.strerror or exc}") from exc
    return data.encode("utf-8")


def _request_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or any(c in line for c in "\r\n"):
            raise ConfigError(f"not a header 'NAME: VALUE': {line!r}")
        headers.append((name.strip(), value.strip()))
    return headers


def _get(args: argparse.Namespace) -> int:
    config = _tunnel_config(args)
    body = _request_body(args.data)
    headers = _request_headers(args.header)
    method: str = (args.request or ("POST" if body is not None else "GET")).upper()
    path: str = args.path if args.path.startswith("/") else "/" + args.path
    import httpx

    from rendezvous.agent.mobile import client

    host, port = config.server
    relay = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Digest is the client's own; Basic goes with the first request, one round trip.
    basic = ({"auth": httpx.BasicAuth(config.uuid, config.password)}
             if config.auth == "basic" else {})
    try:
        with (
            client(config.uuid, config.server, ca_pem=config.ca_pem, password=config.password,
                   timeout=args.timeout, follow_redirects=args.location, **basic) as http,
            http.stream(method, path, headers=headers, content=body) as response,
        ):
            return _write_response(args, response)
    except httpx.TimeoutException:
        err(f"error: no answer through relay {relay} within {args.timeout:g} s")
    except httpx.ConnectError as exc:
        reason = re.sub(r"^\[Errno -?\d+\] ", "", str(exc))
        hint = " (is --ca the relay's certificate?)" if "CERTIFICATE_VERIFY" in reason else ""
        err(f"error: cannot reach relay {relay}: {reason}{hint}")
    except httpx.HTTPError as exc:
        err(f"error: request through relay {relay} failed: {exc or type(exc).__name__}")
    return EXIT_ERROR


def _write_response(args: argparse.Namespace, response: Any) -> int:
    """Write the response as ``get`` promises; its exit status."""
    from rendezvous.agent.mobile import MAX_ERROR_BODY, relay_diagnostic

    status: int = response.status_code
    length = response.headers.get("content-length", "")
    if (status >= 400 and length.isdigit() and int(length) <= MAX_ERROR_BODY
            and response.headers.get("content-type", "").startswith("application/json")):
        diagnostic = relay_diagnostic(status, response.read())
        if diagnostic is not None:
            _err_status(status, diagnostic)
            return 1
    output: Path | None = args.output
    with contextlib.ExitStack() as stack:
        if output is None:
            stream = sys.stdout.buffer
        else:
            try:
                stream = stack.enter_context(output.open("wb"))
            except OSError as exc:
                raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc
        if args.include:
            head = [f"{response.http_version} {status} {response.reason_phrase}\r\n".encode()]
            head += [name + b": " + value + b"\r\n" for name, value in response.headers.raw]
            stream.write(b"".join(head) + b"\r\n")
        for chunk in response.iter_bytes():
            stream.write(chunk)
        stream.flush()
    if status >= 400:
        _err_status(status, response.reason_phrase)
        return 1
    return 0


def _err_status(status: int, reason: str) -> None:
    # Only a hidden server that checks its visitors makes the relay refuse a user name.
    hint = (" (the hidden server checks visitors: pass its --visitor-password)"
            if status == 401 else "")
    err(f"error: {status} {reason}{hint}")
