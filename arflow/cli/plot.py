"""Plot a run's training curves as one PNG.

Reads:  RUN_DIR/metrics.jsonl (what the trainer logs: loss, grad norm, lr, images/s, the share
        of step time spent waiting for data, MFU or TFLOP/s, FID / IS when evaluated).
Writes: RUN_DIR/metrics.png, or --out. Needs matplotlib (the `train` extra).

  arflow plot runs/digits_cpu
  arflow plot runs/xl256 --out xl256-curves.png
"""

from __future__ import annotations

import argparse

from .common import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (run.dir) holding metrics.jsonl")
    parser.add_argument("--out", help="the PNG to write (default: RUN_DIR/metrics.png)")


def run(args: argparse.Namespace) -> int:
    from arflow.utils.plot_metrics import plot_metrics

    try:
        print(plot_metrics(args.run_dir, args.out))
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    return 0
