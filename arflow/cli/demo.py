"""The demo: train the digits model on CPU processes under deepspeed, then sample and judge it.

1. Writes scikit-learn's digits as shards (--data), unless its manifest.json exists.
2. Trains the config (default digits_cpu) with --processes CPU ranks under the deepspeed
   launcher (`deepspeed --module arflow train ... --resume auto`: a re-run continues or just
   re-reports the last checkpoint).
3. Samples --samples EMA images (balanced labels) and measures their class-consistency: the
   fraction that an SVM trained on half of the real digits (and their mirror images, as the
   training flips) assigns to the label the sample was conditioned on, next to that SVM's
   held-out accuracy.

Reads:  scikit-learn's bundled digits; the config (--config, --set).
4. Plots the training curves (metrics.png, as `arflow plot`).

Reads:  scikit-learn's bundled digits; the config (--config, --set).
Writes: --data (shards, manifest.json); --run-dir: metrics.jsonl, tensorboard/, checkpoints/,
        samples/, wandb/, model.safetensors, ema.safetensors, digits_grid.png (one row per
        digit), digits_demo.json (the measurements) and metrics.png (the curves).

  arflow demo                          # what `make demo` runs
  arflow demo --no-train --samples 200 # judge the run already in --run-dir again
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .common import config_arguments, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser, required=False)
    parser.set_defaults(config="digits_cpu")
    parser.add_argument(
        "--data", default="data/digits", help="shard directory (default %(default)s)"
    )
    parser.add_argument(
        "--run-dir", default="runs/digits_cpu", help="run directory (default %(default)s)"
    )
    parser.add_argument(
        "--processes", type=positive_int, default=2, help="training ranks (default %(default)s)"
    )
    parser.add_argument(
        "--no-train", action="store_true", help="skip steps 1 and 2: judge the run in --run-dir"
    )
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=1000,
        help="samples for the class-consistency (default %(default)s)",
    )
    parser.add_argument(
        "--method", choices=["sde", "euler", "heun"], help="default: the config's samples.sampler"
    )
    parser.add_argument(
        "--steps", type=positive_int, help="sampling steps; default: the config's samples.sampler"
    )


def run(args: argparse.Namespace) -> int:
    from arflow.config import load_config

    overrides = [f"data.url={args.data}", f"run.dir={args.run_dir}", *args.set]
    cfg = load_config(args.config, overrides)  # a config error stops the demo before any work
    if not args.no_train:
        write_digits(cfg.data.url, cfg.model.input_size)
        status = train(args.config, overrides, args.processes)
        if status:
            return status
    judge(cfg, args.samples, method=args.method, steps=args.steps)
    if (Path(cfg.run.dir) / "metrics.jsonl").exists():
        from arflow.utils.plot_metrics import plot_metrics

        print(f"training curves: {plot_metrics(cfg.run.dir)}")
    return 0


def write_digits(out: str, image_size: int) -> None:
    """Step 1: scikit-learn's digits as shards, unless they are there."""
    if (Path(out) / "manifest.json").exists():
        return
    from arflow.data.writing.build import build_shards
    from arflow.data.writing.encoders import PixelEncoder
    from arflow.data.writing.sources import make_source

    manifest = build_shards(
        make_source("digits", image_size), PixelEncoder(image_size), out, progress=False
    )
    print(f"wrote {manifest.url}: {sum(manifest.counts)} digits in {len(manifest.shards)} shards")


def train(config: str, overrides: list[str], processes: int) -> int:
    """Step 2: the training job under the deepspeed launcher; returns its exit status."""
    from arflow.distributed.env import free_port

    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",  # the `deepspeed` command, from this interpreter
        "--master_port",  # not the fixed default: another job on this machine may hold it
        str(free_port()),
        "--num_gpus",
        str(processes),
        "--module",
        "arflow",
        "train",
        "--config",
        config,
        *(a for item in overrides for a in ("--set", item)),
        "--resume",
        "auto",
    ]
    print("$ deepspeed " + " ".join(command[3:]), flush=True)
    return subprocess.run(command).returncode


def judge(cfg, samples: int, method: str | None = None, steps: int | None = None) -> dict:
    """Step 3: sample the run's EMA weights, write the grid, measure the class-consistency."""
    import dataclasses

    import torch

    from arflow.flow.samplers import sample
    from arflow.models import load_pretrained
    from arflow.utils.digits import digit_classifier, to_digit_features
    from arflow.utils.images import grid_pixels, save_grid

    run_dir = Path(cfg.run.dir)
    model = load_pretrained(run_dir)  # the run's ema.safetensors
    classes = model.num_classes
    labels = torch.arange(samples) % classes
    chosen = {"method": method, "steps": steps}
    sampler = dataclasses.replace(
        cfg.samples.sampler, **{k: v for k, v in chosen.items() if v is not None}
    )
    t0 = time.perf_counter()
    images = sample(model, labels, list(range(samples)), sampler)  # 8x8 images: one batch
    seconds = time.perf_counter() - t0

    per_row = 10
    order = torch.cat([torch.nonzero(labels == c)[:per_row, 0] for c in range(classes)])
    grid = run_dir / "digits_grid.png"
    save_grid(grid_pixels(images[order]), grid, cols=per_row)

    clf, accuracy = digit_classifier()
    predicted = clf.predict(to_digit_features(images))
    consistency = float((predicted == labels.numpy()).mean())
    result = {
        "class_consistency": consistency,
        "classifier_heldout_accuracy": accuracy,
        "samples": samples,
        "sampler": f"{sampler.method} {sampler.steps} steps",
        "sampling_seconds": round(seconds, 1),
        "grid": str(grid),
    }
    (run_dir / "digits_demo.json").write_text(json.dumps(result, indent=2))
    print(f"classifier held-out accuracy (real digits): {accuracy:.1%}")
    print(f"class-consistency of {samples} EMA samples: {consistency:.1%}")
    print(f"per-class grid: {grid}")
    print(
        f"outputs in {run_dir}: metrics.jsonl, tensorboard/, checkpoints/, samples/, "
        "digits_grid.png, metrics.png, ema.safetensors, wandb/"
    )
    return result
