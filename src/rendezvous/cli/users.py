"""``rendezvous users add|list|show|rotate|visitor|rename|remove``: the hidden servers."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

from rendezvous import registrar
from rendezvous.cli.options import (
    Commands,
    Formatter,
    Handler,
    err,
    int_in,
    provisioning_options,
    store,
    store_options,
)
from rendezvous.config import DEFAULT_PORT, Store
from rendezvous.errors import ConfigError
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.protocol.hostnames import visitor_url
from rendezvous.provisioning import MAX_DIGITS, MIN_DIGITS
from rendezvous.registry import Entry, Registry, new_secret
from rendezvous.registry.base import DEFAULT_DIGITS, DEFAULT_STEP, PROXY_VERSIONS, normal_name

# IDs travel in `CONNECT uuid:ID?...`, in Digest/Basic user names and in file names: keep new ones
# to URL-unreserved characters so none of those needs quoting.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")

_USERS_EPILOG = (
    "Exit status: 0 on success; 2 on any error, among them an unknown ID, an ID that\n"
    "already exists and an unreachable registry."
)


def _with_relay_file(handler: Handler) -> Handler:
    """``handler`` after the registry and public address missing from its flags are taken
    from the relay's settings (RENDEZVOUS_* variables, DATA_DIR/relay.toml)."""

    def run(args: argparse.Namespace) -> int:
        from rendezvous.cli.configcmd import apply_relay_file

        apply_relay_file(args)
        return handler(args)

    return run


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Add ``users`` and its actions to ``commands``."""
    users = commands.add_parser(
        "users",
        formatter_class=Formatter,
        help="manage hidden servers in the registry",
        description="Add, list, show, rotate and remove the hidden servers the relay accepts.\n"
        "Changes take effect at once, also on a running relay.",
        epilog=_USERS_EPILOG,
    )
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    registry = store_options()
    output = provisioning_options()

    def action(name: str, handler: Handler, help: str,
               *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = actions.add_parser(
            name,
            parents=[registry, *parents],
            formatter_class=Formatter,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=_USERS_EPILOG,
        )
        p.set_defaults(handler=_with_relay_file(handler))
        return p

    add = action("add", _add, "add a hidden server and write its provisioning file", output)
    add.add_argument("--label", default="", help="a name for people, e.g. 'living-room hub'")
    add.add_argument(
        "--name",
        default="",
        help="a DNS label, unique: with 'serve --domain D' visitors open https://NAME.D/ "
        "with no credentials (default: none)",
    )
    add.add_argument(
        "--uuid",
        metavar="ID",
        help="the hidden server's ID: letters, digits and . _ ~ - (default: a random UUID)",
    )
    add.add_argument(
        "--step",
        type=int_in(1, 3600),
        default=DEFAULT_STEP,
        metavar="SECONDS",
        help="TOTP time step (default: %(default)s)",
    )
    add.add_argument(
        "--digits",
        type=int,
        choices=range(MIN_DIGITS, MAX_DIGITS + 1),
        default=DEFAULT_DIGITS,
        help="TOTP code length, 6 to 8 (default: %(default)s)",
    )
    add.add_argument(
        "--visitor-password",
        metavar="PASSWORD",
        help="make visitors log in: the relay checks their Digest (or Basic) password before "
        "pairing (default: none; any password, as node-rendezvous)",
    )

    proxy_option(add, "(default: none)")

    lst = action("list", _list, "list the hidden servers")
    lst.add_argument("--json", action="store_true", help="print a JSON array (no secrets)")

    show = action("show", _show, "show one hidden server")
    show.add_argument("id", metavar="ID")
    show.add_argument("--secret", action="store_true", help="include the base32 TOTP secret")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.add_argument("--domain", help="the relay's --domain, for the visitor URL (default: the "
                      "one the relay of this data folder last started with)")

    rotate = action(
        "rotate",
        _rotate,
        "give a hidden server a new secret and write its new provisioning file (for the relay "
        "address given for it before, else the one its old file names, unless told otherwise)",
        output,
    )
    rotate.add_argument("id", metavar="ID")
    proxy_option(rotate, "(default: as the entry has it)")

    visitor = action(
        "visitor",
        _visitor,
        "set or clear the password visitors of a hidden server must log in with",
    )
    visitor.add_argument("id", metavar="ID")
    choice = visitor.add_mutually_exclusive_group(required=True)
    choice.add_argument("--password", help="the new visitor password (Digest user name: ID)")
    choice.add_argument("--off", action="store_true",
                        help="no visitor check: any password is accepted again")

    rename = action(
        "rename",
        _rename,
        "give a hidden server a name (its visitor URL is https://NAME.DOMAIN/) or clear it",
    )
    rename.add_argument("id", metavar="ID")
    naming = rename.add_mutually_exclusive_group(required=True)
    naming.add_argument("name", metavar="NAME", nargs="?",
                        help="one DNS label: letters, digits and hyphens")
    naming.add_argument("--clear", action="store_true", help="take its name away")

    remove = action("remove", _remove, "remove a hidden server; it can no longer park")
    remove.add_argument("id", metavar="ID")


def proxy_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--proxy-protocol``: what the provisioning file tells the agent about PROXY headers."""
    parser.add_argument(
        "--proxy-protocol",
        type=int,
        choices=PROXY_VERSIONS,
        metavar="0|1|2",
        help="the hidden server's local service speaks the PROXY protocol: the file tells its "
        "agent to have each pairing start with a PROXY header of this version naming the "
        f"visitor ('hidden --proxy-protocol' overrides it); 0 for none {default}",
    )


# ---------------------------------------------------------------------------- helpers


def local_time(timestamp: float) -> str:
    """A wall-clock time in ISO form in the local zone; a dash for none."""
    if not timestamp:
        return "-"  # node-rendezvous's records carry no timestamps
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return moment.isoformat(timespec="seconds")


def one_line(text: str) -> str:
    """``text`` with every run of white space (newlines too) made one space."""
    return " ".join(text.split())


def _opened(args: argparse.Namespace, *, create: bool = False) -> Store:
    """The data folder and registry of ``args``, the folder checked (or made, with ``create``)."""
    found = store(args)
    registrar.prepare_data_dir(found, create=create)
    return found


def _out_path(args: argparse.Namespace, found: Store, uuid: str) -> Path | None:
    """Where the provisioning file goes; None when it only goes to stdout."""
    out: Path | None = args.out
    if out is not None:
        return out
    if args.json:
        return None
    return registrar.provisioning_path(found, uuid)


def _provision(
    args: argparse.Namespace, found: Store, uuid: str, change: registrar.Change, *,
    replaces: bool,
) -> tuple[Entry, Path | None, str]:
    """Run ``registrar.provision`` for ``change`` with the relay address the flags and the
    data folder give; print the document when asked; warn about a loopback host."""
    out = _out_path(args, found, uuid)
    previous = None
    if replaces:
        old = out
        if old is None:
            with contextlib.suppress(ConfigError):  # --json for an ID that is no file name
                old = registrar.provisioning_path(found, uuid)
        previous = registrar.previous_file(old, uuid)

    async def op(registry: Registry) -> tuple[Entry, dict[str, Any], registrar.PublicAddress]:
        # A rotation keeps the relay address given for the entry before (its own file may be
        # elsewhere, or gone).
        recorded = await registry.get(uuid) if replaces else None
        public = registrar.public_address(
            found, host=args.server_host, port=args.server_port, ca_file=args.ca,
            no_ca=args.no_ca, previous=previous, entry=recorded,
        )
        entry, doc = await registrar.provision(registry, change, public.relay, out)
        return entry, doc, public

    entry, doc, public = registrar.with_registry(found.registry_url, op)
    if args.json:
        print(json.dumps(doc, indent=2))
    if public.warning is not None:
        err(f"warning: {public.warning}")
    return entry, out, public.facts


def _report(action: str, entry: Entry, out: Path | None, facts: str, json_out: bool) -> None:
    """Say what was done; on stderr when stdout carries the JSON document."""
    stream = sys.stderr if json_out else sys.stdout
    label = f" ({one_line(entry.label)})" if entry.label else ""
    print(f"{action} hidden server {entry.uuid}{label}", file=stream)
    if out is not None:
        print(f"  provisioning file {out} (mode 0600: it holds the secret)", file=stream)
    print(f"  {facts}", file=stream)
    if entry.proxy_protocol:
        print(f"  {_proxy_words(entry)}", file=stream)


def _proxy_words(entry: Entry) -> str:
    """What the entry's file asks of the agent about PROXY headers, for people."""
    if not entry.proxy_protocol:
        return "none"
    return (f"v{entry.proxy_protocol}: each pairing reaches the local service after a PROXY "
            "header naming the visitor")


def _public_record(entry: Entry, *, secret: bool) -> dict[str, Any]:
    """The entry for display: times in local ISO form, the secret only when asked for."""
    record = entry.to_record()
    record["created"] = local_time(entry.created)
    record["updated"] = local_time(entry.updated)
    if not secret:
        del record["authParams"]["base32"]
        record.pop("visitor", None)
    record["visitorCheck"] = entry.visitor is not None
    return record


def _url(found: Store, entry: Entry, domain: str | None) -> str | None:
    """The entry's visitor URL: under ``domain`` if given, else the recorded relay's domain."""
    if not entry.name:
        return None
    record = registrar.recall_relay(found.data_dir)
    if domain is not None:
        return visitor_url(entry.name, domain, record.port if record is not None else DEFAULT_PORT)
    return record.visitor_url(entry.name) if record is not None else None


# ---------------------------------------------------------------------------- the actions


def _add(args: argparse.Namespace) -> int:
    found = store(args)
    uuid: str = args.uuid if args.uuid is not None else str(uuid4())
    name = normal_name(args.name)
    if not _ID_PATTERN.fullmatch(uuid):
        raise ConfigError(
            f"invalid ID {uuid!r}: use 1 to 128 letters, digits and . _ ~ -, starting with a "
            "letter or digit"
        )
    entry = Entry(
        uuid=uuid, base32=new_secret(), step=args.step, digits=args.digits, label=args.label,
        name=name,
        visitor=(VisitorSecret.from_password(uuid, args.visitor_password)
                 if args.visitor_password else None),
        proxy_protocol=args.proxy_protocol or 0,
        # Given here, the relay's address stays this entry's: later rotations keep it.
        server_host=args.server_host or "", server_port=args.server_port or 0,
    )
    registrar.prepare_data_dir(found, create=True)
    added, out, facts = _provision(args, found, uuid, registrar.adding(entry), replaces=False)
    _report("added", added, out, facts, args.json)
    return 0


# What a running relay on this registry does about a rotation or removal (server/revocation.py).
_REVOKED = ("a running relay closes the connections parked with the old secret (within "
            "--registry-poll for SQLite, at once for Redis); pairings already relaying finish")


def _rotate(args: argparse.Namespace) -> int:
    found = _opened(args)
    uuid: str = args.id
    change = registrar.rotating(uuid, proxy_protocol=args.proxy_protocol,
                                server_host=args.server_host, server_port=args.server_port)
    entry, out, facts = _provision(args, found, uuid, change, replaces=True)
    _report("rotated the secret of", entry, out, facts, args.json)
    stream = sys.stderr if args.json else sys.stdout
    print("  the old secret no longer works: give the hidden server its new file", file=stream)
    print(f"  {_REVOKED}", file=stream)
    return 0


def _visitor(args: argparse.Namespace) -> int:
    found = _opened(args)
    uuid: str = args.id
    password: str | None = None if args.off else args.password
    if password is not None and not password:
        raise ConfigError("the visitor password is empty (use --off for no check)")
    registrar.with_registry(found.registry_url, registrar.set_visitor_password(uuid, password))
    if password is None:
        print(f"hidden server {uuid}: visitors are no longer checked")
    else:
        print(f"hidden server {uuid}: visitors must now log in (user name {uuid}, the password "
              "you gave), from the hidden server's next parked connection on")
    return 0


def _rename(args: argparse.Namespace) -> int:
    found = _opened(args)
    uuid: str = args.id
    name: str = "" if args.clear else args.name
    if not args.clear and not name.strip():
        raise ConfigError("the name is empty (use --clear for no name)")
    entry = registrar.with_registry(found.registry_url, registrar.renaming(uuid, name))
    if not entry.name:
        print(f"hidden server {uuid}: no name; visitors reach it the original's way only")
        return 0
    url = _url(found, entry, None)
    where = f" at {url}" if url else " (start the relay with --domain for its URL)"
    print(f"hidden server {uuid} is named {entry.name}: visitors reach it{where}")
    return 0


def _list(args: argparse.Namespace) -> int:
    found = _opened(args)

    async def op(registry: Registry) -> list[Entry]:
        return await registry.list()

    entries = registrar.with_registry(found.registry_url, op)
    if args.json:
        print(json.dumps([_public_record(e, secret=False) for e in entries], indent=2))
        return 0
    if not entries:
        err(f"no hidden servers in {registrar.redact(found.registry_url)}")
        return 0
    # The NAME column only once some entry has a name: registries without names list as before.
    named = any(e.name for e in entries)
    rows = [("ID", *(("NAME",) if named else ()), "LABEL", "CREATED")]
    rows += [(e.uuid, *((e.name or "-",) if named else ()), one_line(e.label),
              local_time(e.created)) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=False))
              + "  " + row[-1])
    return 0


def _show(args: argparse.Namespace) -> int:
    found = _opened(args)
    uuid: str = args.id

    async def op(registry: Registry) -> Entry:
        return await registrar.get_entry(registry, uuid)

    entry = registrar.with_registry(found.registry_url, op)
    url = _url(found, entry, args.domain)
    if args.json:
        record = _public_record(entry, secret=args.secret)
        if url is not None:
            record["url"] = url
        print(json.dumps(record, indent=2))
        return 0
    print(f"ID:       {entry.uuid}")
    print(f"name:     {entry.name or '-'}")
    if entry.name:
        print(f"URL:      {url or '(unknown: pass --domain, or start the relay with --domain)'}")
    print(f"label:    {one_line(entry.label)}")
    print(f"step:     {entry.step} s")
    print(f"digits:   {entry.digits}")
    print(f"created:  {local_time(entry.created)}")
    print(f"updated:  {local_time(entry.updated)}")
    print(f"secret:   {entry.base32 if args.secret else '(hidden; pass --secret)'}")
    visitors = ("checked: they log in as " + entry.uuid + " with the visitor password"
                if entry.visitor is not None else "not checked: any password (set one with "
                f"'users visitor {entry.uuid} --password P')")
    print(f"visitors: {visitors}")
    print(f"PROXY:    {_proxy_words(entry)}")
    own = " and ".join(f"{part} {value}" for part, value in (("host", entry.server_host),
                                                             ("port", entry.server_port)) if value)
    relay = (f"{own} (its own, from --server-host/--server-port)" if own
             else "the relay address of its data folder (relay.json)")
    print(f"relay:    {relay}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    found = _opened(args)
    uuid: str = args.id

    async def op(registry: Registry) -> None:
        await registry.remove(uuid)

    registrar.with_registry(found.registry_url, op)
    print(f"removed hidden server {uuid} from {registrar.redact(found.registry_url)}")
    print(f"  {_REVOKED}")
    return 0
