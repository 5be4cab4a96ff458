"""The end of `make demo`: sample the trained digits model with its EMA weights and measure it.

    python -m arflow.utils.digits_demo --config configs/digits_cpu.json

Writes a per-class grid PNG (one row per digit) and prints the class-consistency of N samples:
the fraction that a classifier trained on the real digits assigns to the label the sample was
conditioned on, next to that classifier's held-out accuracy. The training pipeline flips images
horizontally at random, so the classifier is trained on the real digits and their mirror
images: it judges samples against the distribution the model was trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arflow.config import load_config
from arflow.flow.samplers import sample
from arflow.models import load_pretrained
from arflow.utils.images import grid_pixels, save_grid


def digit_halves(seed: int = 0):
    """scikit-learn's digits ((N, 8, 8) grey, 0..16) split into two halves stratified by class:
    (x_train, x_test, y_train, y_test). The same `seed` gives the same split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    return train_test_split(
        digits.images, digits.target, test_size=0.5, random_state=seed, stratify=digits.target
    )


def digit_classifier(seed: int = 0):
    """SVM on half of scikit-learn's digits (+ mirror images); returns (classifier, held-out accuracy)."""
    from sklearn.svm import SVC

    x_train, x_test, y_train, y_test = digit_halves(seed)
    x_train = np.concatenate([x_train, x_train[:, :, ::-1]])
    y_train = np.concatenate([y_train, y_train])
    x_test = np.concatenate([x_test, x_test[:, :, ::-1]])
    y_test = np.concatenate([y_test, y_test])
    clf = SVC(gamma=0.001, C=10.0).fit(x_train.reshape(len(x_train), -1), y_train)
    return clf, float(clf.score(x_test.reshape(len(x_test), -1), y_test))


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, 64) on scikit-learn's scale: 8x8 grey, values 0..16."""
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-1] != 8:
        grey = F.interpolate(grey, size=(8, 8), mode="area")
    return ((grey.clamp(-1, 1) + 1) * 8).flatten(1).numpy()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument(
        "--samples", type=int, default=1000, help="samples for the class-consistency"
    )
    parser.add_argument(
        "--method", choices=["sde", "euler", "heun"], help="default: the config's samples.sampler"
    )
    parser.add_argument("--steps", type=int, help="default: the config's samples.sampler")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    run_dir = Path(cfg.run.dir)

    model = load_pretrained(run_dir)  # the run's ema.safetensors
    classes = model.num_classes
    labels = torch.arange(args.samples) % classes
    chosen = {"method": args.method, "steps": args.steps}
    sampler = dataclasses.replace(
        cfg.samples.sampler, **{k: v for k, v in chosen.items() if v is not None}
    )
    t0 = time.perf_counter()
    images = sample(model, labels, list(range(args.samples)), sampler)  # 8x8 images: one batch
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
        "samples": args.samples,
        "sampler": f"{sampler.method} {sampler.steps} steps",
        "sampling_seconds": round(seconds, 1),
        "grid": str(grid),
    }
    (run_dir / "digits_demo.json").write_text(json.dumps(result, indent=2))
    print(f"classifier held-out accuracy (real digits): {accuracy:.1%}")
    print(f"class-consistency of {args.samples} EMA samples: {consistency:.1%}")
    print(f"per-class grid: {grid}")
    return result


if __name__ == "__main__":
    main()
