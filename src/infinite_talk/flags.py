"""Command-line flags from the options schema (`options.py`): one argparse group per options class, and back.

Used by `infinite-talk generate` (cli.py) and `infinite-talk serve` (service/app.py), so both offer exactly the
options of the schema.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import get_origin, get_type_hints

_CLI_NAMES = {"t5_tokenizer": "t5-tokenizer"}


def flag_name(name: str) -> str:
    return "--" + _CLI_NAMES.get(name, name.replace("_", "-"))


def add_schema(parser: argparse.ArgumentParser, cls, skip: set[str] = frozenset()) -> None:
    """One flag per field of the options class `cls` (but those in `skip`), unset (None) unless given."""
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        kind = hints[f.name]
        help_text = meta.get("help", "")
        choices = [c for c in (meta.get("choices") or ()) if c is not None] or None
        if f.name == "bbox":
            group.add_argument(flag_name(f.name), dest=f.name, type=int, nargs=4, action="append",
                               metavar=("ROW_MIN", "COL_MIN", "ROW_MAX", "COL_MAX"),
                               help=help_text + " (repeat once per speaker)")
            continue
        if get_origin(kind) is list:  # e.g. --lora A --lora B:0.5
            group.add_argument(flag_name(f.name), dest=f.name, action="append", metavar="VALUE",
                               help=help_text + " (repeat the flag for several)")
            continue
        if kind in (bool,) or str(kind) == "bool":
            group.add_argument(flag_name(f.name), dest=f.name, action="store_true", help=help_text)
            continue
        text = str(kind)
        caster = int if "int" in text and "float" not in text else float if "float" in text else str
        if choices and all(isinstance(c, int) for c in choices):
            caster = int
        group.add_argument(flag_name(f.name), dest=f.name, type=caster, choices=choices, default=None,
                           help=f"{help_text} (default: {f.default})" if f.default is not None else help_text)


def given_values(cls, ns: argparse.Namespace, base: dict | None = None) -> dict:
    """The values the user gave explicitly (flags set, plus `base`)."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is not None and value is not False:
            values[f.name] = value
    return values


def build_options(cls, ns: argparse.Namespace, base: dict | None = None):
    """The validated options of class `cls` from the flags given (and `base`)."""
    return cls(**given_values(cls, ns, base)).validate()
