"""The paper's claim at laptop scale, printed as JSON: ARFlow against the SiT baseline and the
paper's attention ablation, trained on scikit-learn's digits (8x8) on CPU.

Every arm trains the same network (the `model` section of configs/digits_cpu.json, the demo's)
with the same optimiser, LR schedule, gradient clipping and EMA (its `optim`, `train` and `ema`
sections), through the library's own code: `ARFlow`, `flow.transport.training_loss`,
`distributed.ema.EMA` and `flow.samplers.sample`. Sequences are assembled from the digits by
class (a uniformly drawn class, n distinct images of it), noise levels sorted per sequence.

Arms:
  arflow           n = 5 same-class images per sequence, hybrid attention; sampled with the
                   state carried across the denoising steps (the paper's model).
  causal_softmax   the same sequences; block-causal softmax across the images instead of the
                   linear state (the paper's attention ablation); sampled with a growing
                   key/value cache.
  sit_same_batch   n = 1: every image alone, the state always empty in training and sampling
                   (SiT on the same backbone); B sequences of one image per batch.
  sit_same_images  n = 1 with 5 B single images per batch.

Budgets. Every arm takes the same number K of optimiser steps. Images seen = optimiser steps x
sequences per batch x images per sequence: K x B x 5 for arflow and causal_softmax, K x B x 1
for sit_same_batch, K x 5B x 1 for sit_same_images. Hence two comparisons:
  equal optimiser steps (and the same batch of B sequences): arflow, causal_softmax,
      sit_same_batch;
  equal images seen (and equal steps): arflow, causal_softmax, sit_same_images.
Matching images by giving SiT 5 K steps at batch B instead was not chosen: it would also change
the number of updates, the LR schedule's length and the EMA's horizon.

Metrics, on `--samples` EMA samples per run (balanced labels, the same seeds in every run):
  class_consistency  the fraction that the demo's classifier (an SVM on half of the real
                     digits and their mirror images; its held-out accuracy is printed) assigns
                     to the conditioning label;
  fd_features        Fréchet distance to all 1,797 real digits in the 64-d penultimate layer
                     (after its ReLU) of an MLP 64-128-64-10 trained on the same half of the
                     real digits (held-out accuracy printed);
  fd_pixels          Fréchet distance to the real digits in pixel space (64 grey values in
                     [0, 1]).
Both distances are also printed between the two halves of the real digits, as a floor: a finite
sample set never reaches 0.

    python benchmarks/paper_ablation.py            # 3 seeds x 4 arms, 2,000 steps each
    python benchmarks/paper_ablation.py --quick    # smoke test: 1 seed, 150 steps
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from arflow.config import load_config
from arflow.distributed.backend import make_optimizer, param_groups
from arflow.distributed.ema import EMA
from arflow.eval.statistics import frechet_distance
from arflow.flow.samplers import SamplerConfig, sample
from arflow.flow.transport import training_loss
from arflow.models import ARFlow
from arflow.utils.digits import digit_classifier, digit_halves, to_digit_features
from arflow.utils.schedule import lr_at

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_cpu.json"


@dataclass(frozen=True)
class Arm:
    name: str
    attention: str
    images_per_sequence: int
    batch_factor: int  # sequences per batch = batch_factor x B
    memory: bool  # sampling carries the state across steps

    def images_per_step(self, batch: int) -> int:
        return self.batch_factor * batch * self.images_per_sequence


ARMS = {
    arm.name: arm
    for arm in (
        Arm("arflow", "hybrid", 5, 1, True),
        Arm("causal_softmax", "causal_softmax", 5, 1, True),
        Arm("sit_same_batch", "hybrid", 1, 1, False),
        Arm("sit_same_images", "hybrid", 1, 5, False),
    )
}
COMPARISONS = {
    "equal_optimiser_steps": ["arflow", "causal_softmax", "sit_same_batch"],
    "equal_images_seen": ["arflow", "causal_softmax", "sit_same_images"],
}
METRICS = ("class_consistency", "fd_features", "fd_pixels")


# ------------------------------------------------------------------------------------- data
class DigitSequences:
    """scikit-learn's digits as pixels in [-1, 1] (grey repeated on `channels`), drawn as
    sequences of distinct images of one uniformly drawn class."""

    def __init__(self, channels: int):
        from sklearn.datasets import load_digits

        digits = load_digits()
        grey = torch.from_numpy(digits.images).float() / 8 - 1  # 0..16 -> [-1, 1]
        self.images = grey[:, None].expand(-1, channels, -1, -1).contiguous()  # (1797, C, 8, 8)
        self.labels = torch.from_numpy(digits.target)
        self.classes = int(self.labels.max()) + 1
        counts = torch.bincount(self.labels, minlength=self.classes)
        # (classes, max count) image indices per class, padded; `valid` marks the real entries.
        self.valid = torch.arange(int(counts.max()))[None] < counts[:, None]
        self.table = torch.zeros(self.valid.shape, dtype=torch.long)
        self.table[self.valid] = torch.argsort(self.labels, stable=True)

    def batch(self, sequences: int, n: int, gen: torch.Generator):
        """-> x1 (sequences, n, C, 8, 8), y (sequences,): n distinct images of class y each."""
        y = torch.randint(self.classes, (sequences,), generator=gen)
        keys = torch.rand(sequences, self.table.shape[1], generator=gen)
        keys = keys.masked_fill(~self.valid[y], -1.0)  # never draw a padding entry
        picks = self.table[y[:, None], keys.topk(n, dim=1).indices]
        return self.images[picks], y


# ---------------------------------------------------------------------------------- metrics
class FeatureNet(nn.Module):
    """MLP 64-128-64-10 on digits scaled to [0, 1]; `features` is the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Judge:
    """Everything a run is measured with: the demo's SVM, the feature network, and the real
    digits' statistics in both spaces. Built once, shared by every run."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits

        self.svm, self.svm_accuracy = digit_classifier(seed)
        pixels = load_digits().images.reshape(-1, 64).astype(np.float32) / 16  # [0, 1]
        # The same split as digit_classifier's, so both classifiers hold out the same half.
        x_train, x_test, y_train, y_test = digit_halves(seed)
        x_train, x_test = (x.reshape(-1, 64).astype(np.float32) / 16 for x in (x_train, x_test))
        self.net, self.net_accuracy = self.train_feature_net(x_train, y_train, x_test, y_test, seed)
        self.real = {"pixels": self.stats(pixels), "features": self.stats(self.embed(pixels))}
        self.floor = {
            "fd_pixels": self.distance(self.stats(x_train), self.stats(x_test)),
            "fd_features": self.distance(
                self.stats(self.embed(x_train)), self.stats(self.embed(x_test))
            ),
        }

    @staticmethod
    def train_feature_net(x_train, y_train, x_test, y_test, seed, epochs=300):
        torch.manual_seed(seed)
        net = FeatureNet()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
        x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
        for _ in range(epochs):  # full batch: ~900 images
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            predicted = net(torch.from_numpy(x_test)).argmax(1).numpy()
        return net.eval(), float((predicted == y_test).mean())

    @torch.no_grad()
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return self.net.features(torch.from_numpy(pixels)).numpy()

    @staticmethod
    def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = x.astype(np.float64)
        return x.mean(0), np.cov(x, rowvar=False)

    @staticmethod
    def distance(a, b) -> float:
        return frechet_distance(*a, *b)

    def measure(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """images: (B, C, 8, 8) samples in [-1, 1]; labels: (B,) their conditioning labels."""
        grey16 = to_digit_features(images)  # (B, 64) on the SVM's 0..16 scale
        pixels = (grey16 / 16).astype(np.float32)
        consistency = float((self.svm.predict(grey16) == labels.numpy()).mean())
        return {
            "class_consistency": round(consistency, 4),
            "fd_features": round(
                self.distance(self.stats(self.embed(pixels)), self.real["features"]), 4
            ),
            "fd_pixels": round(self.distance(self.stats(pixels), self.real["pixels"]), 4),
        }


# ------------------------------------------------------------------------------------- runs
def train(arm: Arm, seed: int, steps: int, batch: int, data: DigitSequences, cfg) -> tuple:
    """Train one arm from scratch; returns (EMA model, mean loss of the last 10% of steps)."""
    arch = dict(cfg.model.architecture(), attention=arm.attention)
    torch.manual_seed(seed)  # initial weights and label dropout
    model = ARFlow(**arch).train()
    optimizer = make_optimizer(param_groups(model, cfg.optim.weight_decay), cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ema = EMA(trainable, cfg.ema.decay)
    gen = torch.Generator().manual_seed(seed)  # sequences, noise levels and noise
    # As the trainer does: each element clamped, or the global norm bounded.
    by_value = cfg.train.grad_clip_mode == "value"
    clip = nn.utils.clip_grad_value_ if by_value else nn.utils.clip_grad_norm_
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, cfg.optim)
        x1, y = data.batch(arm.batch_factor * batch, arm.images_per_sequence, gen)
        loss = training_loss(model, x1, y, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            clip(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        ema.update()
        losses.append(loss.detach())
    ema_model = ARFlow(**arch)
    missing, unexpected = ema_model.load_state_dict(ema.shadow, strict=False)
    assert not unexpected and set(missing) == {"pos_embed"}, (missing, unexpected)
    tail = torch.stack(losses[-max(1, steps // 10) :]).mean()
    return ema_model.eval(), float(tail)


def run(name: str, seed: int, args: argparse.Namespace) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Train and sample one (arm, seed) on one thread (runs go in parallel processes: a model
    this small gains little from intra-op threads). Returns (record, samples, their labels)."""
    torch.set_num_threads(1)
    arm, cfg = ARMS[name], load_config(args.config)
    data = DigitSequences(cfg.model.in_channels)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    model, loss = train(arm, seed, args.steps, args.batch, data, cfg)
    t1 = time.perf_counter()
    labels = torch.arange(args.samples) % data.classes
    sampler = SamplerConfig(method=args.sampler, steps=args.sampler_steps)
    images = sample(model, labels, list(range(args.samples)), sampler, memory=arm.memory)
    record = {
        "arm": name,
        "seed": seed,
        "optimiser_steps": args.steps,
        "sequences_per_batch": arm.batch_factor * args.batch,
        "images_per_sequence": arm.images_per_sequence,
        "images_seen": args.steps * arm.images_per_step(args.batch),
        "final_train_loss": round(loss, 4),
        "train_seconds": round(t1 - t0, 1),
        "sample_seconds": round(time.perf_counter() - t1, 1),
        # This process's CPU time: what the run costs on a quiet core, whatever the load.
        "cpu_seconds": round(time.process_time() - cpu0, 1),
    }
    return record, images, labels


def run_all(args: argparse.Namespace, judge: Judge) -> list[dict]:
    """Every (seed, arm), `args.jobs` at a time; records in (seed, arm) order with metrics."""
    todo = [(name, seed) for seed in range(args.seeds) for name in args.arms]
    records = {}

    def finish(key, result):
        record, images, labels = result
        records[key] = {**record, **judge.measure(images, labels)}
        print(json.dumps(records[key]), file=sys.stderr, flush=True)

    if args.jobs == 1:
        for key in todo:
            finish(key, run(*key, args))
    else:
        context = multiprocessing.get_context("spawn")  # no fork after torch's threads started
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {pool.submit(run, *key, args): key for key in todo}
            for future in as_completed(futures):
                finish(futures[future], future.result())
    return [records[key] for key in todo]


def summarise(runs: list[dict]) -> dict:
    """Per arm and metric: mean, sample standard deviation (None for one seed), min, max."""
    summary = {}
    for name in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == name]
        summary[name] = {"seeds": len(mine), "images_seen": mine[0]["images_seen"]}
        for metric in METRICS:
            values = [r[metric] for r in mine]
            summary[name][metric] = {
                "mean": round(statistics.fmean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                "min": min(values),
                "max": max(values),
            }
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 150 steps: a smoke test")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    parser.add_argument("--steps", type=int, help="optimiser steps per run (config's by default)")
    parser.add_argument("--batch", type=int, help="B, sequences per batch (config's by default)")
    parser.add_argument("--samples", type=int, default=1000, help="EMA samples per run")
    parser.add_argument("--sampler", default="euler", choices=["sde", "euler", "heun"])
    parser.add_argument("--sampler-steps", type=int, default=20)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="network/optimiser source")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, args.steps or 150
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config)
    args.steps = args.steps or cfg.train.steps
    args.batch = args.batch or cfg.train.global_batch_size
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    judge = Judge()
    runs = run_all(args, judge)
    report = {
        "definitions": {
            "optimiser_steps": "AdamW updates; the same K for every arm",
            "images_seen": "optimiser steps x sequences per batch x images per sequence",
            "arms": {
                name: {
                    "attention": arm.attention,
                    "images_per_sequence": arm.images_per_sequence,
                    "sequences_per_batch": arm.batch_factor * args.batch,
                    "sampling_state": "carried across steps" if arm.memory else "empty",
                }
                for name, arm in ARMS.items()
                if name in args.arms
            },
            "comparisons": COMPARISONS,
            "class_consistency": "fraction of samples the demo's SVM assigns to their label",
            "fd_features": "Fréchet distance to the 1,797 real digits, penultimate layer "
            "(64-d, after ReLU) of an MLP 64-128-64-10 trained on half of the real digits",
            "fd_pixels": "Fréchet distance to the real digits, 64 grey values in [0, 1]",
        },
        "setup": {
            "config": Path(args.config).name,
            "model": {**cfg.model.architecture(), "attention": "per arm"},
            "optimiser_steps": args.steps,
            "batch_sequences": args.batch,
            "seeds": args.seeds,
            "samples_per_run": args.samples,
            "sampler": f"{args.sampler}, {args.sampler_steps} steps",
            "lr": cfg.optim.lr,
            "schedule": f"{cfg.optim.schedule}, warm-up {cfg.optim.warmup_steps}",
            "grad_clip": f"{cfg.train.grad_clip_mode} {cfg.train.grad_clip}",
            "ema_decay": cfg.ema.decay,
            "parallel_runs": args.jobs,
            "threads_per_run": 1,
        },
        "judges": {
            "svm_heldout_accuracy": round(judge.svm_accuracy, 4),
            "feature_net_heldout_accuracy": round(judge.net_accuracy, 4),
            "floor_real_half_vs_half": {k: round(v, 4) for k, v in judge.floor.items()},
        },
        "runs": runs,
        "summary": summarise(runs),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
