"""EvalConfig: what the trainer's config nests under "eval" and what the evaluator reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..flow.samplers import SamplerConfig


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one FID / IS evaluation.

    num_samples: N, the size of the generated set; index i in [0, N) gets class i % num_classes
        (class-balanced) and its own seed derived from (seed, i).
    batch_size: samples per rank per step of generation, VAE decoding and feature extraction.
    seed: base seed of the sample set; two evaluations with the same seed draw the same images.
    sampler: the autoregressive sampler (method, steps, CFG scale, ...).
    reference: statistics `.npz` with keys mu, sigma (from tools/fid_reference.py, tools/fid.py
        or an ADM reference batch); None computes the Inception Score only and reports fid None.
    inception_weights: torch-fidelity InceptionV3 weights file; None means torch-fidelity's
        cache (downloaded there when the machine is online).
    vae: local diffusers AutoencoderKL folder; needed when the model works on latents.
    latent_scale: the factor latents were multiplied by before training (SD-VAE: 0.18215).
    is_splits: Inception Score splits (10 is the standard).
    every: training steps between periodic evaluations (0 = never); read by the trainer.
    """

    num_samples: int = 50_000
    batch_size: int = 64
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reference: str | None = None
    inception_weights: str | None = None
    vae: str | None = None
    latent_scale: float = 0.18215
    is_splits: int = 10
    every: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"eval.num_samples must be >= 1, got {self.num_samples}")
        if self.seed < 0:
            raise ValueError(f"eval.seed must be >= 0, got {self.seed}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.is_splits < 1 or self.is_splits > self.num_samples:
            raise ValueError(
                f"eval.is_splits must lie in [1, num_samples={self.num_samples}], got {self.is_splits}"
            )
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")
        if self.latent_scale <= 0:
            raise ValueError(f"eval.latent_scale must be > 0, got {self.latent_scale}")

    @classmethod
    def from_dict(cls, d: dict) -> EvalConfig:
        """Build from the config's "eval" mapping; "sampler" may be a nested mapping.

        Raises ValueError naming any unknown key (eval.<key> or eval.sampler.<key>).
        """
        d = dict(d)
        _reject_unknown(cls, d, "eval")
        sampler = d.get("sampler")
        if isinstance(sampler, dict):
            _reject_unknown(SamplerConfig, sampler, "eval.sampler")
            d["sampler"] = SamplerConfig(**sampler)
        elif sampler is not None and not isinstance(sampler, SamplerConfig):
            raise ValueError(f"eval.sampler must be a mapping, got {type(sampler).__name__}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain JSON-able mapping; from_dict(to_dict()) round-trips."""
        return dataclasses.asdict(self)


def _reject_unknown(cls, d: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in known:
            raise ValueError(f"unknown key {where}.{key}; known keys: {', '.join(sorted(known))}")
