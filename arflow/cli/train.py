"""Train ARFlow from a config: one process, or every rank of a torchrun / deepspeed job.

Reads:  the config (--config, --set); the shards at data.url (local or s3://); with --resume,
        a checkpoint of checkpoint.dir or the one named; eval.vae / eval.reference /
        eval.inception_weights when the config evaluates.
Writes: run.dir: metrics.jsonl, samples/ (EMA grids), wandb/, model.safetensors and
        ema.safetensors at the end; checkpoints/step_NNNNNNNNN (or checkpoint.dir).

  arflow train --config digits_cpu --set data.url=data/digits
  torchrun --nproc_per_node 8 -m arflow train --config xl_256 --resume auto
  deepspeed --num_gpus 8 --module arflow train --config xl_256 --resume auto
"""

from __future__ import annotations

import argparse
import os

from .common import config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
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


def run(args: argparse.Namespace) -> int:
    # Before the seconds of torch / deepspeed imports: a preemption notice during start-up then
    # exits with a message instead of a bare status 143.
    from arflow.utils.signals import PreemptionSignals

    signals = PreemptionSignals().install()
    from arflow.config import load_config

    cfg = load_config(args.config, args.set)
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # before any process group or model
    from arflow.train import run as train

    train(cfg, resume=args.resume, overwrite=args.overwrite, signals=signals)
    return 0
