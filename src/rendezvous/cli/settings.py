"""``relay.toml``: every ``serve`` flag as a key of one TOML file, and the order they win in.

    flag  >  environment variable  >  file  >  default

The mapping is derived from the argparse definitions, so a new flag gets a key (and a variable)
without a table written by hand:

    key       the flag's name without its dashes: ``--pool-size`` -> ``pool-size``
    section   the flag's argument group: limits, registry, cluster, admin, tls, public, ...
              (``failed CONNECTs`` and ``wrong visitor passwords`` go under ``limits``); the
              listener's ``host`` and ``port`` are top-level keys
    variable  ``RENDEZVOUS_`` and the key in capitals, dashes as underscores:
              ``--pool-size`` -> ``RENDEZVOUS_POOL_SIZE``; true/false (1/0, yes/no, on/off) for
              switches, commas between the values of a repeatable flag

A value is checked by the flag's own argument type, so a file says what the command line says.
An unknown key or a bad value is a :class:`ConfigError` naming the key and the file's line.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import textwrap
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rendezvous.errors import ConfigError

ENV_PREFIX = "RENDEZVOUS_"
T = TypeVar("T")

ENV_CONFIG = "RENDEZVOUS_CONFIG"
CONFIG_FILE = "relay.toml"  # in the data folder, read when present and no --config is given
# Groups whose options live under another section's name (they are limits too), and the
# group argparse puts untitled options in (top-level keys).
SECTION_OF_GROUP = {
    "failed CONNECTs": "limits",
    "wrong visitor passwords": "limits",
    "admin page": "admin",
    "public address": "public",
    "options": "",
}
# Options that are never keys: they choose the file, or only ask argparse for help.
NOT_KEYS = frozenset({"help", "config", "version"})
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: the flag it mirrors and where it sits in the file and the environment."""

    action: argparse.Action
    section: str  # "": top level
    name: str  # the key inside its section

    @property
    def dest(self) -> str:
        """The argparse destination (the Namespace attribute)."""
        return self.action.dest

    @property
    def flag(self) -> str:
        """The long flag, e.g. ``--pool-size``."""
        return next(s for s in self.action.option_strings if s.startswith("--"))

    @property
    def env(self) -> str:
        """The environment variable, e.g. ``RENDEZVOUS_POOL_SIZE``."""
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def where(self) -> str:
        """``[section] name``, or ``name`` for a top-level key."""
        return f"[{self.section}] {self.name}" if self.section else self.name

    @property
    def is_switch(self) -> bool:
        """Whether the flag takes no value (``store_true``)."""
        return isinstance(self.action, argparse._StoreTrueAction)

    @property
    def is_list(self) -> bool:
        """Whether the flag may be repeated (``append``)."""
        return isinstance(self.action, argparse._AppendAction)


def section_name(title: str | None) -> str:
    """The file section of an argument group titled ``title``."""
    if title is None:
        return ""
    if title in SECTION_OF_GROUP:
        return SECTION_OF_GROUP[title]
    return re.sub(r"[^a-z0-9]+", "-", title.lower().split("(")[0].strip()).strip("-")


def keys_of(parser: argparse.ArgumentParser) -> list[Key]:
    """Every option of ``parser`` that is a key, in the order ``--help`` lists them."""
    found: list[Key] = []
    for group in parser._action_groups:
        section = section_name(group.title)
        if group.title == "positional arguments":
            continue
        for action in group._group_actions:
            if action.dest in NOT_KEYS or not action.option_strings:
                continue
            if not any(s.startswith("--") for s in action.option_strings):
                continue
            flag = next(s for s in action.option_strings if s.startswith("--"))
            found.append(Key(action, section, flag[2:]))
    return found


# ---------------------------------------------------------------------------- values


def convert(key: Key, value: Any, source: str) -> Any:
    """``value`` (from TOML or a variable's text) as the flag would have it; ConfigError naming
    ``source`` (e.g. ``relay.toml:12: [limits] pool-size``) when it is unusable."""
    action = key.action
    if key.is_switch:
        if isinstance(value, str) and source.startswith("$"):
            word = value.strip().lower()
            if word in TRUE_WORDS | FALSE_WORDS:
                return word in TRUE_WORDS
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: must be true or false, not {value!r}")
    if key.is_list:
        items: list[Any]
        if isinstance(value, str) and source.startswith("$"):
            items = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list):
            items = value
        else:
            raise ConfigError(f"{source}: must be a list of strings, e.g. [\"a\", \"b\"], "
                              f"not {value!r}")
        return [_one(action, item, source) for item in items]
    if action.nargs == "?" and action.const is not None and isinstance(value, bool):
        # `admin = true` is `--admin` with no value; false leaves it off.
        return action.const if value else None
    return _one(action, value, source)


def _one(action: argparse.Action, value: Any, source: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{source}: must be {_kind(action)}, not {value!r}")
    expects_number = _kind(action) == "a number"
    if isinstance(value, int | float) and not expects_number:
        raise ConfigError(f"{source}: must be a string (in quotes), not {value!r}")
    if isinstance(value, str) and expects_number and not source.startswith("$"):
        raise ConfigError(f"{source}: must be a number (no quotes), not {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(f"{source}: must be one of {choices}, not {value!r}")
    return converted


# Metavars of the flags that take a number (a default that is a number says so too).
NUMERIC_METAVARS = frozenset({"N", "SECONDS", "BYTES", "PORT"})


def _kind(action: argparse.Action) -> str:
    default = action.default
    numeric_default = isinstance(default, int | float) and not isinstance(default, bool)
    if numeric_default or action.metavar in NUMERIC_METAVARS:
        return "a number"
    return "a string"


def toml_value(value: Any) -> str:
    """``value`` written as TOML (for ``config init`` and ``config show``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        host = f"[{value[0]}]" if ":" in str(value[0]) else str(value[0])
        return toml_value(f"{host}:{value[1]}")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


# ---------------------------------------------------------------------------- the file


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A parsed relay.toml: its path, its tables and its text (to find a key's line)."""

    path: Path
    data: Mapping[str, Any]
    text: str

    def line_of(self, section: str, name: str) -> int | None:
        """The line (from 1) where ``name`` is set in ``[section]`` (tomllib gives no line
        numbers: a scan of the text for the table header, then the key)."""
        current = ""
        header = re.compile(r"^\s*\[\s*([^\]\s]+)\s*\]")
        key = re.compile(rf"^\s*(?:{re.escape(name)}|\"{re.escape(name)}\")\s*=")
        dotted = (re.compile(rf"^\s*{re.escape(section)}\.{re.escape(name)}\s*=")
                  if section else None)
        for number, line in enumerate(self.text.splitlines(), 1):
            match = header.match(line)
            if match:
                current = match.group(1).strip('"')
                continue
            if current == section and key.match(line):
                return number
            if dotted is not None and current == "" and dotted.match(line):
                return number
        return None

    def source(self, section: str, name: str) -> str:
        """``FILE:LINE: [section] name`` for messages."""
        line = self.line_of(section, name)
        where = f"[{section}] {name}" if section else name
        return f"{self.path}:{line}: {where}" if line else f"{self.path}: {where}"


def read_file(path: Path) -> ConfigFile:
    """Parse ``path``; ConfigError for a missing or unreadable file or bad TOML (with its line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends "(at line N, column M)".
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return ConfigFile(path, data, text)


def file_values(found: ConfigFile, keys: Sequence[Key]) -> dict[str, tuple[Any, str]]:
    """``dest -> (value, source)`` for every key the file sets; ConfigError for an unknown key
    or a bad value, naming the key and its line."""
    by_place = {(k.section, k.name): k for k in keys}
    sections = {k.section for k in keys if k.section}
    values: dict[str, tuple[Any, str]] = {}

    def unknown(section: str, name: str) -> ConfigError:
        where = found.source(section, name)
        elsewhere = [k.where for k in keys if k.name == name]
        if elsewhere:
            hint = f" (it belongs in {elsewhere[0]})"
        else:
            close = difflib.get_close_matches(name, [k.name for k in keys], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        return ConfigError(f"{where}: unknown key{hint}")

    for name, value in found.data.items():
        if isinstance(value, dict) and name in sections:
            for inner, inner_value in value.items():
                key = by_place.get((name, inner))
                if key is None:
                    raise unknown(name, inner)
                values[key.dest] = (convert(key, inner_value, found.source(name, inner)),
                                    f"file {found.path}:{found.line_of(name, inner) or '?'}")
            continue
        if isinstance(value, dict):
            line = next((n for n, text in enumerate(found.text.splitlines(), 1)
                         if re.match(rf"^\s*\[\s*\"?{re.escape(name)}\"?\s*\]", text)), None)
            known = ", ".join(f"[{s}]" for s in sorted(sections))
            raise ConfigError(f"{found.path}:{line or '?'}: unknown section [{name}] "
                              f"(the sections are {known})")
        key = by_place.get(("", name))
        if key is None:
            raise unknown("", name)
        values[key.dest] = (convert(key, value, found.source("", name)),
                            f"file {found.path}:{found.line_of('', name) or '?'}")
    return values


# ---------------------------------------------------------------------------- precedence


@dataclass(frozen=True, slots=True)
class Setting:
    """One effective setting and where it came from."""

    key: Key
    value: Any
    source: str  # "flag", "env $NAME", "file PATH:LINE" or "default"


def given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations ``argv`` sets (parsed again with every default suppressed)."""
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        given = parser.parse_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)
    return set(vars(given))


def default_config_path(args: argparse.Namespace, environ: Mapping[str, str]) -> Path | None:
    """The file to read: --config, else $RENDEZVOUS_CONFIG, else DATA_DIR/relay.toml when it
    exists (the data folder by its flag or variable), else none."""
    given: Path | None = getattr(args, "config", None)
    if given is not None:
        return given
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    from rendezvous.config import DEFAULT_DATA_DIR, ENV_DATA_DIR

    data_dir: Path = (getattr(args, "data_dir", None) or Path(environ.get(ENV_DATA_DIR)
                                                              or DEFAULT_DATA_DIR))
    candidate = data_dir / CONFIG_FILE
    return candidate if candidate.is_file() else None


def resolve(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    *,
    strict: bool = True,
) -> list[Setting]:
    """Set every key of ``parser`` on ``args`` by precedence (flag > variable > file >
    default) and say where each came from. ``argv``: the command's own arguments.

    With ``strict`` False, keys the file sets that ``parser`` does not know are skipped (a
    command that reads only part of the relay's file, e.g. its public address).
    """
    environ = os.environ if environ is None else environ
    keys = keys_of(parser)
    given = given_on_command_line(parser, argv)
    path = default_config_path(args, environ)
    from_file: dict[str, tuple[Any, str]] = {}
    if path is not None:
        found = read_file(path)
        from_file = file_values(found, keys) if strict else _lenient_values(found, keys)
    settings = []
    for key in keys:
        if key.dest in given:
            value, source = getattr(args, key.dest), "flag"
        elif environ.get(key.env) is not None and key.env != ENV_CONFIG:
            value = convert(key, environ[key.env], f"${key.env}")
            source = f"env ${key.env}"
        elif key.dest in from_file:
            value, source = from_file[key.dest]
        else:
            value, source = key.action.default, "default"
        setattr(args, key.dest, value)
        settings.append(Setting(key, value, source))
    args.config_file = path
    return settings


def _lenient_values(found: ConfigFile, keys: Sequence[Key]) -> dict[str, tuple[Any, str]]:
    values: dict[str, tuple[Any, str]] = {}
    for key in keys:
        table = found.data.get(key.section, {}) if key.section else found.data
        if isinstance(table, dict) and key.name in table:
            values[key.dest] = (
                convert(key, table[key.name], found.source(key.section, key.name)),
                f"file {found.path}:{found.line_of(key.section, key.name) or '?'}",
            )
    return values


# ---------------------------------------------------------------------------- show and init


def by_section(items: Iterable[T], section_of: Callable[[T], str]) -> list[T]:
    """``items`` with each section's together (top-level keys first, then sections in the order
    they first appear): TOML allows a table only once, and groups of one section need not be
    next to each other in ``--help``."""
    listed = list(items)
    first: dict[str, int] = {}
    for index, item in enumerate(listed):
        first.setdefault(section_of(item), index)
    return sorted(listed, key=lambda item: (section_of(item) != "", first[section_of(item)]))


def show(settings: Sequence[Setting], secret: frozenset[str] = frozenset()) -> str:
    """The effective settings as TOML, each with where it came from in a comment."""
    lines: list[str] = []
    section: str | None = None
    for setting in by_section(settings, lambda s: s.key.section):
        key = setting.key
        if key.section != section:
            section = key.section
            if section:
                lines.append(f"\n[{section}]")
        if setting.value is None:
            text = f"# {key.name} (not set)"
        else:
            shown = "(hidden)" if key.dest in secret else setting.value
            text = f"{key.name} = {toml_value(shown)}"
        lines.append(f"{text:<48} # {setting.source}")
    return "\n".join(lines).lstrip("\n") + "\n"


def template(parser: argparse.ArgumentParser) -> str:
    """A commented relay.toml with every default (keys with no default commented out)."""
    lines = [
        "# relay.toml: the settings of `rendezvous serve` (README, \"Configuration\").",
        "# Each key is a serve flag without its dashes; a flag or a RENDEZVOUS_<KEY> variable",
        "# (capitals, dashes as underscores) wins over this file. Every value here is the default.",
    ]
    section: str | None = None
    for key in by_section(keys_of(parser), lambda k: k.section):
        if key.section != section:
            section = key.section
            lines.append(f"\n[{section}]" if section else "")
        action = key.action
        help_text = (action.help or "").replace("%(default)s", str(action.default))
        help_text = re.sub(r"\s+", " ", help_text.replace("%%", "%"))
        lines += textwrap.wrap(f"{key.flag}: {help_text}", 96, initial_indent="# ",
                               subsequent_indent="#   ")
        default = action.default
        if default is None or default == [] or default == ():
            example = ('["..."]' if key.is_list else
                       "(a number)" if _kind(action) == "a number" else '"..."')
            lines.append(f"# {key.name} = {example}")
        else:
            lines.append(f"{key.name} = {toml_value(default)}")
    return "\n".join(lines) + "\n"
