"""`--config FILE`: a TOML file of option values that `dfuse run` and `dfuse serve` both read.

    model = "tiny-sd3"            # keys are the long flag names (--slot-mib: slot_mib or slot-mib)
    devices = "cpu:0,cpu:1"       # values are written as on the command line
    placement = "cpu:0=encoder+decoder,cpu:1=dit"

    [serve]                       # only for `dfuse serve` (and [run] only for `dfuse run`)
    port = 8080

A top-level key is any option of either command (a command skips the ones it does not have, so
one file can configure both); a key in a command's table must be an option of that command and
wins over the same key at the top level. The values become the command's defaults (click's
default_map), so a flag given on the command line always wins, and the parameter source says
which values came from the file. The whole file is checked before anything starts, for both
commands: an unknown key or a value of the wrong type is a usage error naming the file and the key.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Mapping

import click

# Options a file cannot set: --config itself (arguments such as PROMPT are not options at all).
_NOT_FROM_A_FILE = {"config", "help"}


def read_config(path: Path, command: str, commands: Mapping[str, click.Command]) -> dict:
    """The settings `path` gives the command named `command`: {parameter name: converted value}.
    `commands` maps each table name ("run", "serve") to its command, to check every table."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise click.UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.UsageError(f"{path}: not valid TOML: {e}") from None

    options = {name: _options(cmd) for name, cmd in commands.items()}
    shared = {key: value for key, value in document.items() if not (key in commands and isinstance(value, dict))}
    # The shared keys first: a command's own table, read after them, wins.
    scopes = {"": shared} | {name: document[name] for name in commands if isinstance(document.get(name), dict)}
    settings: dict[str, dict] = {name: {} for name in commands}
    for table, values in scopes.items():
        known = _merged(options.values()) if not table else options[table]
        for written, key, value in _normalised(path, table, values):
            where = f"{path}: {_qualified(table, written)}"
            option = known.get(key)
            if option is None:
                elsewhere = [f"dfuse {name}" for name in commands if key in options[name]]
                if elsewhere:  # e.g. port in [run]
                    raise click.UsageError(f"{where}: not an option of dfuse {table}, only of {', '.join(elsewhere)}")
                raise click.UsageError(f"{where}: unknown key; {_known_keys(key, known, table)}")
            converted = _convert(where, option, value)
            for name in [table] if table else commands:
                if key in options[name]:
                    settings[name][key] = converted
    return settings[command]


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name not in _NOT_FROM_A_FILE}


def _merged(option_sets) -> dict[str, click.Option]:
    merged: dict[str, click.Option] = {}
    for options in option_sets:
        for name, option in options.items():
            merged.setdefault(name, option)
    return merged


def _normalised(path: Path, table: str, values: dict) -> list[tuple[str, str, object]]:
    """(key as written, parameter name, value): slot-mib and slot_mib both name slot_mib; a key
    given in both spellings is refused."""
    out, seen = [], {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in seen:
            raise click.UsageError(f"{path}: {_qualified(table, key)}: given twice (as {seen[name]} and {key})")
        if isinstance(value, dict):
            raise click.UsageError(f"{path}: [{table + '.' if table else ''}{key}]: unknown table; the tables "
                                   "are [run] and [serve], and values are written as on the command line")
        seen[name] = key
        out.append((key, name, value))
    return out


def _qualified(table: str, key: str) -> str:
    return f"[{table}] {key}" if table else key


def _known_keys(key: str, known: Mapping[str, click.Option], table: str) -> str:
    scope = f"dfuse {table}" if table else "dfuse run or dfuse serve"
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{hint}the keys are the long flag names of {scope}: {', '.join(sorted(known))}"


def _convert(where: str, option: click.Option, value):
    """The value as the option's own type makes it, refusing what TOML typed otherwise (a port
    written "8000" is a string: the file says so, unlike a command line where all is text)."""
    kinds, what = _toml_kinds(option)
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise click.UsageError(f"{where}: expected {what} (as {_flag(option)} takes), got {_toml(value)}")
    try:
        return option.type.convert(value, option, None)
    except click.BadParameter as e:
        raise click.UsageError(f"{where}: {e.message}") from None


def _toml_kinds(option: click.Option) -> tuple[tuple[type, ...], str]:
    """The TOML value types `option` takes, and how to say so."""
    declared = getattr(option.type, "toml_kinds", None)  # an option type that says it itself
    if declared is not None:
        return declared
    if option.is_bool_flag or isinstance(option.type, click.types.BoolParamType):
        return (bool,), "true or false"
    if isinstance(option.type, click.types.IntParamType):
        return (int,), "an integer"
    if isinstance(option.type, click.types.FloatParamType):
        return (int, float), "a number"
    return (str,), "a string"


def _flag(option: click.Option) -> str:
    return max(option.opts, key=len)


def _toml(value) -> str:
    """A value as it was written in the file (json.dumps: "text", true, 3.5)."""
    return json.dumps(value, default=str)
