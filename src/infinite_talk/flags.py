"""Command-line flags from the options schema (`options.py`): one argparse group per options class, and back.

Used by `infinite-talk generate` (cli.py) and `infinite-talk serve` (service/app.py), so both offer exactly the
options of the schema. argparse only collects the text; types, choices and ranges are the schema's (`options.read`),
so a flag is refused with the same message as the same value in the UI or the job API.
"""

from __future__ import annotations

import argparse
import dataclasses

from .options import field_kind, read_values

_CLI_NAMES = {"t5_tokenizer": "t5-tokenizer"}


def flag_name(name: str) -> str:
    return "--" + _CLI_NAMES.get(name, name.replace("_", "-"))


def add_schema(parser: argparse.ArgumentParser, cls, skip: set[str] = frozenset()) -> None:
    """One flag per field of the options class `cls` (but those in `skip`), unset (None) unless given."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_text = f.metadata.get("help", "")
        kind, _ = field_kind(cls, f.name)
        choices = [str(c) for c in (f.metadata.get("choices") or ()) if c is not None]
        if kind == "boxes":  # --bbox R0 C0 R1 C1 --bbox ... or --bbox 'R0 C0 R1 C1; R0 C0 R1 C1'
            group.add_argument(flag_name(f.name), dest=f.name, nargs="+", action="append", metavar="N",
                               help=help_text + " (ROW_MIN COL_MIN ROW_MAX COL_MAX; repeat the flag once per "
                                                "speaker)")
        elif kind == "lines":  # e.g. --lora A --lora B:0.5
            group.add_argument(flag_name(f.name), dest=f.name, action="append", metavar="VALUE",
                               help=help_text + " (repeat the flag for several)")
        elif kind == "bool":
            group.add_argument(flag_name(f.name), dest=f.name, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag_name(f.name), dest=f.name, default=None,
                               metavar="{" + ",".join(choices) + "}" if choices else None,
                               help=f"{help_text} (default: {f.default})" if f.default is not None else help_text)


def given_values(cls, ns: argparse.Namespace, base: dict | None = None) -> dict:
    """The typed values the user gave explicitly (flags set, over the raw values in `base`), read through the
    schema: a wrong type, an unknown choice or a value out of range is an `OptionError` naming the option."""
    raw = dict(base or {})
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is not None:
            raw[f.name] = value
    return read_values(cls, raw)


def build_options(cls, ns: argparse.Namespace, base: dict | None = None):
    """The validated options of class `cls` from the flags given (and `base`)."""
    return cls(**given_values(cls, ns, base)).validate()
