"""``rendezvous config show|init``: serve's settings file (relay.toml, see ``settings``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rendezvous.cli import serve, settings
from rendezvous.cli.options import (
    Commands,
    Formatter,
    err,
    runtime_options,
    store,
    store_options,
)
from rendezvous.errors import ConfigError

# Shown as "(hidden)" by `config show`: secrets have no place on a terminal or in a paste.
SECRET_KEYS = frozenset({"admin_password", "cluster_key"})


def serve_options(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """A parser with exactly serve's options (``p``, or a new one)."""
    if p is None:
        p = argparse.ArgumentParser(add_help=False,
                                    parents=[store_options(), runtime_options(log_level=True)])
    serve.add_options(p)
    return p


def add_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Add ``config show`` and ``config init`` to ``commands``."""
    p = commands.add_parser(
        "config",
        formatter_class=Formatter,
        help="serve's settings file: show the effective settings, or write a new file",
        description="serve reads DIR/relay.toml (or --config FILE): every serve option is a\n"
        "key, named like the flag without its dashes, in the section of its group in\n"
        "'serve --help'. A flag wins over a RENDEZVOUS_<KEY> variable (the key in capitals,\n"
        "dashes as underscores), which wins over the file, which wins over the default.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show",
        parents=[store_options(), runtime_options(log_level=True)],
        formatter_class=Formatter,
        help="print serve's effective settings and where each came from",
        description="Print the settings 'serve' would run with, given the same options, as\n"
        "TOML, each with where it came from: flag, env, file (with its line) or default.",
    )
    serve_options(show)
    show.set_defaults(handler=_show, parser=show)
    init = actions.add_parser(
        "init",
        parents=[store_options()],
        formatter_class=Formatter,
        help="write a commented relay.toml with every default",
        description="Write a relay.toml that sets every key to its default, each with its\n"
        "flag's help; edit what you need and delete the rest.",
    )
    serve.config_option(init)
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=_init)


def _show(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    found = settings.resolve(parser, args, serve.own_argv(args, "config", "show"))
    source = args.config_file
    print(f"# settings file: {source.resolve() if source is not None else 'none'}")
    sys.stdout.write(settings.show(found, secret=SECRET_KEYS))
    return 0


def _init(args: argparse.Namespace) -> int:
    target: Path = args.config or store(args).data_dir / settings.CONFIG_FILE
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists: keep it, or overwrite it with --force")
    text = settings.template(serve_options())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
    err(f"wrote {target}")
    return 0


# Sections of relay.toml that other commands read too: the registry, and the public address
# provisioning files give (so a file made by `users add` is right for the relay it came from).
SHARED_SECTIONS = ("registry", "public")


def apply_relay_file(args: argparse.Namespace) -> None:
    """Fill the registry and public-address options ``args`` did not get from the command line
    from their RENDEZVOUS_* variables, else the relay's settings file (``users``, ``admin``)."""
    parser = serve_options()
    keys = [k for k in settings.keys_of(parser)
            if k.section in SHARED_SECTIONS and k.dest != "data_dir"
            and getattr(args, k.dest, False) is None]
    if not keys:
        return
    path = settings.default_config_path(args, os.environ)
    from_file = settings.file_values(settings.read_file(path), settings.keys_of(parser)) \
        if path is not None else {}
    for key in keys:
        if os.environ.get(key.env) is not None:
            setattr(args, key.dest, settings.convert(key, os.environ[key.env], f"${key.env}"))
        elif key.dest in from_file:
            setattr(args, key.dest, from_file[key.dest][0])
