"""benchmarks/paper_ablation.py end to end at a size far below --quick: every arm trains, samples
and is measured, and the JSON report has the schema the README's table is filled from."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_ablation  # noqa: E402

ARMS = ["arflow", "causal_softmax", "sit_same_batch", "sit_same_images"]
METRICS = ["class_consistency", "fd_features", "fd_pixels"]


def test_report_schema(capsys):
    argv = [
        "--steps",
        "2",
        "--batch",
        "2",
        "--samples",
        "20",
        "--sampler-steps",
        "2",
        "--seeds",
        "2",
        "--jobs",
        "1",
    ]
    report = paper_ablation.main(argv)
    assert json.loads(capsys.readouterr().out) == report

    assert report["definitions"]["images_seen"].startswith("optimiser steps x sequences")
    assert report["definitions"]["comparisons"] == {
        "equal_optimiser_steps": ["arflow", "causal_softmax", "sit_same_batch"],
        "equal_images_seen": ["arflow", "causal_softmax", "sit_same_images"],
    }
    assert report["setup"]["optimiser_steps"] == 2 and report["setup"]["samples_per_run"] == 20
    judges = report["judges"]
    assert judges["svm_heldout_accuracy"] > 0.9 and judges["feature_net_heldout_accuracy"] > 0.9
    assert all(v > 0 for v in judges["floor_real_half_vs_half"].values())

    runs = report["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [(a, s) for s in (0, 1) for a in ARMS]
    seen = {r["arm"]: r["images_seen"] for r in runs}
    # steps x sequences per batch x images per sequence, with B = 2
    assert seen == {
        "arflow": 2 * 2 * 5,
        "causal_softmax": 2 * 2 * 5,
        "sit_same_batch": 2 * 2 * 1,
        "sit_same_images": 2 * 10 * 1,
    }
    for r in runs:
        assert 0 <= r["class_consistency"] <= 1 and r["fd_features"] > 0 and r["fd_pixels"] > 0

    summary = report["summary"]
    assert list(summary) == ARMS
    for arm in ARMS:
        assert summary[arm]["seeds"] == 2
        for metric in METRICS:
            stats = summary[arm][metric]
            values = [r[metric] for r in runs if r["arm"] == arm]
            assert stats["min"] == min(values) and stats["max"] == max(values)
            assert stats["std"] is not None and stats["std"] >= 0
