"""Distributed FID / Inception Score evaluation with all-reduced statistics.

    from arflow.eval import EvalConfig, evaluate
    result = evaluate(ema_model, EvalConfig.from_dict(config["eval"]), device="cuda")

Modules: config (EvalConfig), generate (the world-size independent sample set), inception
(torch-fidelity's InceptionV3 with explicit weights), stats (all-reducible sums), metrics
(Fréchet distance, IS), sample_npz (ADM `.npz` output), images (image sources for reference
statistics), reference (statistics of an image set), evaluate (the whole run).
"""

from .config import EvalConfig
from .evaluate import evaluate
from .generate import rank_range, sample_label, sample_seed
from .inception import InceptionFeatures, resolve_weights
from .metrics import frechet_distance, inception_score
from .stats import FeatureStats, load_reference

__all__ = [
    "EvalConfig",
    "FeatureStats",
    "InceptionFeatures",
    "evaluate",
    "frechet_distance",
    "inception_score",
    "load_reference",
    "rank_range",
    "resolve_weights",
    "sample_label",
    "sample_seed",
]
