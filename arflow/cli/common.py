"""Arguments and helpers shared by several subcommands (nothing heavy imported here)."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A command-line mistake found after parsing: reported as argparse reports its own
    (usage, `arflow CMD: error: ...`, exit status 2)."""


def config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--config NAME|PATH and repeatable --set KEY.PATH=VALUE."""
    parser.add_argument(
        "--config",
        required=required,
        metavar="NAME|PATH",
        help="a shipped config by name (xl_256, xl_128, b_256, digits_cpu; `arflow config "
        "--list`) or a JSON file",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. train.steps=1000 (repeatable; JSON values)",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def local_rank_argument(parser: argparse.ArgumentParser) -> None:
    """The deepspeed launcher passes --local_rank=N (before the subcommand with --module, after
    it with a script); the rank comes from the environment, so the value is dropped."""
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
