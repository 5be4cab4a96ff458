#!/usr/bin/env python
"""Train ARFlow. Parses arguments and calls arflow.train.run; every launcher works:

deepspeed [--num_gpus N] [--num_nodes M --hostfile H] launchers/train.py --config configs/xl_256.json
torchrun --nproc_per_node N launchers/train.py --config configs/xl_256.json
python launchers/train.py --config configs/digits_cpu.json --set train.steps=100
"""

import argparse
import os
import sys

from arflow.config import ConfigError, load_config
from arflow.utils.signals import PreemptionSignals


def main(argv=None) -> int:
    # Before the seconds of torch / deepspeed imports: a preemption notice during start-up then
    # exits with a message instead of a bare status 143.
    signals = PreemptionSignals().install()
    parser = argparse.ArgumentParser(description="Train ARFlow from a JSON config.")
    parser.add_argument("--config", required=True, help="JSON config file (see configs/)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. train.steps=1000 (repeatable; JSON values)",
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="'auto': continue the checkpoints in checkpoint.dir (the newest intact one of the "
        "current lineage), if any; or a checkpoint step directory / root, local or URL",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a checkpoint.dir that holds another run's checkpoints, deleting "
        "them (without --resume or --overwrite such a directory is refused)",
    )
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment carries the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # before any process group or model
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from arflow.train import run

    run(cfg, resume=args.resume, overwrite=args.overwrite, signals=signals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
