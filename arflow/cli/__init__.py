"""The `arflow` command: one entry point for the whole life of a model.

    arflow train | sample | evaluate | fid | make-shards | convert | demo | config | plot

Each subcommand is a module of this package with a docstring (its help: what it reads and
writes), `add_arguments(parser)` and `run(args) -> exit status`. The modules import nothing
heavy at the top: torch, the model and the data stack are imported inside `run`, so every
`--help` answers at once. `python -m arflow`, `torchrun -m arflow` and `deepspeed --module
arflow` run the same command; `launchers/*.py` and `tools/*.py` are thin scripts over it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from arflow import __version__
from arflow.config import ConfigError

from .common import UsageError, local_rank_argument

# An optional module -> (its distribution, the extra of pyproject.toml that installs it).
OPTIONAL_MODULES = {
    "torch_fidelity": ("torch-fidelity", "eval"),
    "scipy": ("scipy", "eval"),
    "diffusers": ("diffusers", "vae"),
    "webdataset": ("webdataset", "data"),
    "s3fs": ("s3fs", "data"),
    "sklearn": ("scikit-learn", "data"),
    "deepspeed": ("deepspeed", "train"),
    "wandb": ("wandb", "train"),
    "matplotlib": ("matplotlib", "train"),
}

DESCRIPTION = """\
ARFlow (arXiv 2501.16085): train, sample, evaluate and export autoregressive flow models.

--config takes a shipped config by name (`arflow config --list`) or a JSON file. Every rank of
a job runs the same command:
  torchrun --nproc_per_node 8 -m arflow train --config xl_256 --resume auto
  deepspeed --num_gpus 8 --module arflow train --config xl_256 --resume auto"""

# subcommand -> module of this package
COMMANDS = {
    "train": "train",
    "sample": "sample",
    "evaluate": "evaluate",
    "fid": "fid",
    "make-shards": "make_shards",
    "convert": "convert",
    "demo": "demo",
    "config": "show_config",
    "plot": "plot",
}


def _module(command: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{COMMANDS[command]}")


def _add_command(subparsers, command: str) -> argparse.ArgumentParser:
    module = _module(command)
    parser = subparsers.add_parser(
        command,
        help=module.__doc__.split("\n", 1)[0],
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    local_rank_argument(parser)
    parser.set_defaults(command=command)
    return parser


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `arflow` parser and each subcommand's parser."""
    parser = argparse.ArgumentParser(
        prog="arflow",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`arflow COMMAND --help` says what each command reads and writes.",
    )
    parser.add_argument("--version", action="version", version=f"arflow {__version__}")
    local_rank_argument(parser)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    return parser, {command: _add_command(subparsers, command) for command in COMMANDS}


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (`arflow COMMAND ...`)."""
    return build_parser()[1][command]


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the subcommand; returns the exit status.

    A config problem (a bad file or key) is one line, `arflow CMD: config error: ...`, and
    status 2, as are command-line mistakes; a missing optional dependency is one line naming
    the extra that installs it, status 1. Other errors propagate (under torchrun and deepspeed
    the failure watch reports them to the other ranks).
    """
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    try:
        return _module(args.command).run(args) or 0
    except UsageError as err:
        commands[args.command].error(str(err))
    except ConfigError as err:
        print(f"arflow {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in OPTIONAL_MODULES:
            raise
        distribution, extra = OPTIONAL_MODULES[err.name.split(".")[0]]
        print(
            f"arflow {args.command}: needs {distribution}, which is not installed: "
            f"pip install 'arflow[{extra}]'",
            file=sys.stderr,
        )
        return 1


def script(*command: str) -> int:
    """`main` for a script of the checkout (launchers/, tools/): `command` + its arguments."""
    return main([*command, *sys.argv[1:]])
