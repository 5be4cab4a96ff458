"""Print a resolved config: every key, its value, its default and its meaning.

Reads:  the config (--config NAME|PATH, --set); without --config, the defaults.
Writes: stdout only: each section and key with the value, the default when the value differs,
        and the meaning (the schema's own documentation in arflow/config.py); with --json the
        resolved config as JSON (a file `--config` takes); with --list the shipped configs.

  arflow config --config xl_256 --set train.steps=1000
  arflow config --config digits_cpu --json > my_digits.json
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import typing
from typing import NamedTuple

from arflow import config as schema

from .common import config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser, required=False)
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the resolved config as JSON")
    shown.add_argument("--list", action="store_true", help="list the shipped configs")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: the string literal under each field."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    docs = {}
    for stmt, after in zip(node.body, node.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


class Entry(NamedTuple):
    """One line of the listing: a section (value and default None) or a key."""

    key: str
    meaning: str
    section: bool = False
    value: object = None
    default: object = None


def describe(cfg: object, prefix: str = "") -> list[Entry]:
    """Every section and key of a config in schema order, sections followed by their keys."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    entries = []
    for f in dataclasses.fields(cls):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            meaning = docs.get(f.name) or inspect.getdoc(hints[f.name])
            entries += [Entry(key, meaning, section=True), *describe(value, f"{key}.")]
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        entries.append(Entry(key, docs.get(f.name, ""), value=value, default=default))
    return entries


def listing(cfg: schema.Config) -> str:
    """The text `arflow config` prints: `[section]  doc`, then `key = value  (default ...)`
    over its meaning, indented."""
    lines = []
    for entry in describe(cfg):
        if entry.section:
            lines += ["", f"[{entry.key}]  {entry.meaning.splitlines()[0]}"]
            continue
        shown = json.dumps(entry.value)
        if entry.value != entry.default:
            shown += f"    (default {json.dumps(entry.default)})"
        lines.append(f"{entry.key} = {shown}")
        meaning = " ".join(entry.meaning.split())
        lines += textwrap.wrap(meaning, 96, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines[1:])


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in schema.shipped_config_names():
            print(f"{name}  ({schema.SHIPPED_CONFIGS / name}.json)")
        return 0
    if args.config:
        cfg = schema.load_config(args.config, args.set)
    else:
        cfg = schema.config_from_dict(schema.apply_overrides({}, args.set))
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        print(listing(cfg))
    return 0
