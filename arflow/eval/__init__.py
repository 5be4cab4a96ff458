"""Distributed FID / Inception Score evaluation with all-reduced statistics.

    from arflow.eval import evaluate
    result = evaluate(ema_model, config.eval, device="cuda")

Modules: inception (torch-fidelity's InceptionV3 with explicit weights), statistics (all-reducible
sums, Fréchet distance, Inception Score, reference files), sample_set (the world-size independent
generated set and its ADM `.npz`), image_sets (existing image sets: folders, `.npz`, shards, and
their statistics), evaluate (the whole run), cli (launchers/evaluate.py, tools/fid*.py). The
settings are `arflow.config.EvalConfig`, the `eval` section of the run config.
"""

from .evaluate import check_eval_files, evaluate
from .inception import InceptionFeatures, resolve_weights
from .sample_set import rank_range, sample_labels, sample_seed
from .statistics import FeatureStats, frechet_distance, inception_score, load_reference

__all__ = [
    "FeatureStats",
    "InceptionFeatures",
    "check_eval_files",
    "evaluate",
    "frechet_distance",
    "inception_score",
    "load_reference",
    "rank_range",
    "resolve_weights",
    "sample_labels",
    "sample_seed",
]
