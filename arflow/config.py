"""The one typed configuration schema of a training run.

A run is described by a JSON file (a shipped config named by its stem, e.g. `digits_cpu`, or a
path) plus `--set key.path=value` overrides. Every section is a dataclass whose fields carry
their meaning as attribute docstrings (the string under each field; `arflow config` prints
them). `load_config` checks every key and type and `Config.validate` checks the combinations
that need the world size, all before any model, data or process group is built. Errors are
`ConfigError`s whose message starts with the offending key path (or the file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The configs shipped inside the package (`--config xl_256` names configs/xl_256.json there).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
# Checkpoint step directories are named step_%09d: no step count may need a tenth digit.
MAX_STEP = 999_999_999
STEP_KEYS = (
    "train.steps",
    "checkpoint.every",
    "eval.every",
    "samples.every",
    "logging.every",
    "optim.warmup_steps",
)
# Deeper JSON is refused: the schema nests 3 levels and storage options a few more; recursion
# over a pathological document would otherwise fail far from the file that caused it.
MAX_DEPTH = 16


class ConfigError(ValueError):
    """A configuration problem; the message names the key path (e.g. `train.micro_batch_size`)."""


@dataclass
class RunConfig:
    """The run's identity and output directory."""

    name: str = "arflow"
    """Name of the run: the wandb run name and the progress bar's label."""
    dir: str = "runs/arflow"
    """Output directory: metrics.jsonl, sample grids, wandb files, the final model.safetensors
    and ema.safetensors, and the checkpoints unless checkpoint.dir is set."""
    seed: int = 0
    """Seed of the initial weights, the data order, the noise levels and the label dropout."""


# ---------------------------------------------------------------------------- model zoo
# The named sizes a config's `model.name` picks; here (not in arflow.models) so that the schema
# checks names and shapes without importing the model code.
ARCHITECTURES = {  # size -> (depth, hidden, heads for /2, heads for /4 and /8)
    "S": (12, 384, 6, 6),
    "B": (12, 768, 12, 12),
    "L": (24, 1024, 16, 16),
    "XL": (28, 1152, 18, 16),
}
MODEL_NAMES = tuple(f"ARFlow-{size}/{p}" for size in ARCHITECTURES for p in (2, 4, 8))


def model_kwargs(name: str) -> dict:
    """Architecture of a zoo name such as "ARFlow-XL/2": patch_size, depth, hidden_size, heads."""
    try:
        size, patch = name.removeprefix("ARFlow-").split("/")
        depth, hidden, heads2, heads48 = ARCHITECTURES[size]
        patch = int(patch)
        if patch not in (2, 4, 8):
            raise KeyError(patch)
    except (KeyError, ValueError):
        raise ValueError(
            f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}"
        ) from None
    heads = heads2 if patch == 2 else heads48
    return dict(patch_size=patch, depth=depth, hidden_size=hidden, num_heads=heads)


@dataclass
class ModelConfig:
    """The network: a zoo size, the data's shape and the attention across images."""

    name: str = "ARFlow-XL/2"
    """A zoo name "ARFlow-{S,B,L,XL}/{2,4,8}": size (depth, width, heads) and patch size."""
    input_size: int = 32
    """Side of the model's input in pixels or latent cells (32 for 256 px SD-VAE latents)."""
    in_channels: int = 4
    """Channels of the input: 4 for SD-VAE latents, 3 for RGB pixels."""
    num_classes: int = 1000
    """Number of class labels the model is conditioned on."""
    learn_sigma: bool = True
    """Output twice the input channels and drop the extra half, as the public release does
    (its checkpoints have that shape)."""
    class_dropout_prob: float = 0.1
    """Probability of replacing a label by the null class in training (classifier-free
    guidance); above 0 it adds the null-class row to the label table."""
    depth: int | None = None
    """Transformer blocks; null keeps the zoo's value (override it for small CPU models)."""
    hidden_size: int | None = None
    """Width of the blocks; null keeps the zoo's value."""
    num_heads: int | None = None
    """Attention heads; null keeps the zoo's value."""
    attention: Literal["hybrid", "causal_softmax"] = "hybrid"
    """"hybrid": the paper's model. "causal_softmax": its attention ablation, one block-causal
    softmax across the images instead of the linear state (no gt_proj; the sampling state is a
    key/value cache that grows with every step)."""

    def architecture(self) -> dict:
        """Keyword arguments of `ARFlow(...)`; they fix every parameter shape."""
        arch = model_kwargs(self.name)
        for key in ("depth", "hidden_size", "num_heads"):
            if getattr(self, key) is not None:
                arch[key] = getattr(self, key)
        return dict(
            arch,
            input_size=self.input_size,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            learn_sigma=self.learn_sigma,
            # > 0 adds the null-class row to the label table, so it belongs here too.
            class_dropout_prob=self.class_dropout_prob,
            attention=self.attention,
        )


@dataclass
class DataConfig:
    """The training data: class-bucketed shards streamed into sequences of one class."""

    url: str = "synthetic"
    """Directory or fsspec URL (s3://...) of class-bucketed shards with a manifest.json, or
    "synthetic" for random tensors of the model's shape (benchmarks, smoke tests)."""
    seq_len: int = 5
    """Images per training sequence (n), all of one class, at increasing noise levels."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    class_sampling: Literal["uniform", "proportional"] = "uniform"
    """"uniform": every class yields the same number of sequences per epoch (the release draws
    a uniformly random class per sequence); "proportional": every stored sample once per epoch."""
    storage_options: dict | None = None
    """fsspec options for a data URL, e.g. {"client_kwargs": {"endpoint_url": URL}} for an
    S3-compatible store."""
    prefetch_factor: int = 2
    """Batches each loader worker prepares ahead."""
    min_per_class: int | None = None
    """Classes with fewer samples are dropped with a warning; null: every class must hold at
    least seq_len samples, else the run stops before training and names them."""
    max_bad_samples: int = 100
    """Unreadable samples skipped per rank (its workers together) before the run stops; counted
    since the start (or a resume on another layout) and logged as data_bad_samples."""
    storage_connect_timeout: float = 5.0
    """Object storage (data, checkpoints and the run lock alike): seconds to wait for a
    connection. With the storage defaults an endpoint that accepts connections but never answers
    fails within about a minute."""
    storage_read_timeout: float = 10.0
    """Object storage: seconds to wait for each answer."""
    storage_attempts: int = 5
    """Object storage: attempts per request, retried after about 0.5, 1, 2, 4 s with jitter,
    longer when the store asks with Retry-After (each retry is logged at once)."""


@dataclass(frozen=True)
class ProfileConfig:
    """A torch.profiler window: the `steps` optimizer steps numbered start, start + 1, ...
    (step 1 is the first), traced on every rank to <run.dir>/profile/ (Chrome trace JSON, which
    TensorBoard's profiler plugin and Perfetto read), with a CUDA memory snapshot on GPUs.
    `steps: 0` (the default) profiles nothing."""

    start: int = 10
    """The first optimizer step traced (step 1 is the first of the run)."""
    steps: int = 0
    """Optimizer steps traced; 0 profiles nothing."""

    def __post_init__(self):
        _check(self.start >= 1, "profile.start", f"must be >= 1, got {self.start}")
        _check(self.steps >= 0, "profile.steps", f"must be >= 0, got {self.steps}")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 1000
    """Optimizer steps of the run (at most 999,999,999: checkpoints are named step_%09d)."""
    global_batch_size: int = 256
    """Sequences per optimizer step over all ranks: a multiple of world size x
    micro_batch_size (the quotient is the gradient accumulation)."""
    micro_batch_size: int = 32
    """Sequences per rank per forward/backward pass."""
    grad_clip: float = 3.0
    """The threshold of grad_clip_mode; 0 disables clipping. The logged grad_norm is taken
    before clipping."""
    grad_clip_mode: Literal["value", "norm"] = "value"
    """"value" clamps every gradient element to [-grad_clip, grad_clip] (the public release:
    3.0); "norm" rescales the whole gradient to a global L2 norm <= grad_clip."""
    max_nonfinite_steps: int = 10
    """Consecutive steps with a non-finite loss or gradient (each skipped) after which the run
    stops."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """A torch.profiler window (off by default): see ProfileConfig."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's epsilon (> 0: it guards a division)."""
    weight_decay: float = 0.02
    """Decoupled weight decay; not applied to 1-D parameters (norms, biases)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to lr."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning rate after the warm-up: constant (the release), or a cosine / linear decay to
    min_lr_ratio x lr at the last step."""
    min_lr_ratio: float = 0.0
    """End of the cosine / linear decay, as a fraction of lr."""


@dataclass
class EMAConfig:
    """The exponential moving average of the weights (what is sampled and exported)."""

    decay: float = 0.9999
    """EMA decay, applied after every optimizer step."""


@dataclass
class ParallelConfig:
    """How the model is distributed and computed."""

    backend: Literal["deepspeed", "fsdp2", "ddp"] = "deepspeed"
    """Data-parallel backend: DeepSpeed ZeRO, PyTorch FSDP2 or DDP."""
    zero_stage: int = 2
    """DeepSpeed only: ZeRO stage 1, 2 or 3."""
    precision: Literal["auto", "bf16", "tf32", "fp32"] = "auto"
    """"bf16": bf16 activations (TF32 for what stays fp32); "tf32": fp32 weights and activations
    with TF32 matmuls, as the public release trains; "fp32": exact. "auto": bf16 on CUDA, fp32
    on CPU (where tf32 is plain fp32). Master weights and optimizer state are fp32 always."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of keeping activations."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each transformer block and the final layer (one graph each) before the
    backend wraps or shards them. "auto": on for CUDA, off for CPU (where compiling costs more
    than a short run gains) and under DeepSpeed ZeRO-3, whose per-module parameter hooks cannot
    be compiled (true there is refused)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train: "auto" takes CUDA when present."""
    collective_timeout_s: float = 1800.0
    """How long a collective (or barrier) may wait for the other ranks before the process group
    fails it. A rank that raises stops the others within seconds regardless; this bounds the
    rest, e.g. NCCL peers of a rank killed outright. It must exceed the longest legitimate
    wait: rank 0 converting a checkpoint, a slow save."""


@dataclass
class CheckpointConfig:
    """Where and how often the training state is saved."""

    dir: str | None = None
    """Local path or fsspec URL of the checkpoints; null: <run.dir>/checkpoints."""
    storage_options: dict | None = None
    """fsspec options for a checkpoint URL (e.g. an S3 endpoint_url)."""
    every: int = 1000
    """Steps between checkpoints; 0 saves only at the end and on SIGTERM / SIGUSR1."""
    keep_last: int = 3
    """Checkpoints of the current lineage kept; older ones are deleted after a save."""
    async_save: bool = True
    """Write checkpoints in the background: training waits only while the state is copied to
    host memory (about the checkpoint's size in host RAM per save in flight); false writes in
    the foreground."""


@dataclass
class LoggingConfig:
    """Metrics: metrics.jsonl in run.dir, a progress bar, wandb."""

    every: int = 50
    """Steps between metrics.jsonl / wandb records."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    wandb: bool = True
    """Log to wandb; offline automatically when no credentials are configured."""
    project: str = "arflow"
    """The wandb project."""
    tags: list[str] = field(default_factory=list)
    """The wandb run's tags."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run.dir>/tensorboard/ (rank 0)."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device at the run's precision, for the logged MFU; null: looked
    up from the CUDA device's name (arflow.utils.flops), else MFU is not logged."""


@dataclass(frozen=True)
class SamplerConfig:
    """How images are sampled: the one settings type of the `samples` and `eval` sections,
    `arflow sample` and `arflow.flow.samplers.sample`. Defaults are the reference's: SiT's
    SDE with 250 steps, no guidance (CFG on the first 3 channels when scale != 1)."""

    method: Literal["sde", "euler", "heun"] = "sde"
    """"sde": SiT's Euler-Maruyama (the reference); "euler" / "heun": fixed-step ODE."""
    steps: int = 250
    """Denoising steps. sde: points on [0, 1 - last_step_size], then the final mean step."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale; 1 = none."""
    cfg_channels: int | None = 3
    """Guide only the first K channels (the reference's habit); null = all channels."""
    last_step_size: float = 0.04
    """sde only: the size of the final mean step."""
    precision: Literal["auto", "bf16", "tf32", "fp32"] = "auto"
    """"auto": bf16 autocast with TF32 matmuls on CUDA (the inter-image state stays fp32), fp32
    on CPU; "tf32": fp32 activations with TF32 matmuls (the release's sampling); "fp32": exact."""

    # Messages start with the key inside the section; the parser prefixes the section's path.
    def __post_init__(self):
        methods = ("sde", "euler", "heun")
        _check(
            self.method in methods,
            "sampler.method",
            f"must be one of {methods}, got {self.method!r}",
        )
        low = 2 if self.method == "sde" else 1
        _check(
            self.steps >= low,
            "sampler.steps",
            f"must be >= {low} for {self.method!r}, got {self.steps}",
        )
        _check(self.cfg_scale >= 0, "sampler.cfg_scale", f"must be >= 0, got {self.cfg_scale}")
        _check(
            self.cfg_channels is None or self.cfg_channels >= 1,
            "sampler.cfg_channels",
            f"must be >= 1 or null (all channels), got {self.cfg_channels}",
        )
        _check(
            0 < self.last_step_size < 1,
            "sampler.last_step_size",
            f"must lie in (0, 1), got {self.last_step_size}",
        )
        precisions = ("auto", "bf16", "tf32", "fp32")
        _check(
            self.precision in precisions,
            "sampler.precision",
            f"must be one of {precisions}, got {self.precision!r}",
        )

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


@dataclass
class SamplesConfig:
    """The grid of EMA samples written (and sent to wandb) at each evaluation."""

    every: int = 0
    """Steps between sample grids; 0 = only together with eval.every and at the end of the run."""
    classes: list[int] = field(default_factory=lambda: list(range(8)))
    """Class ids of the grid, one row each."""
    per_class: int = 8
    """Samples per class (the grid's columns)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """How the grid is sampled."""


@dataclass(frozen=True)
class EvalConfig:
    """FID / Inception Score of the EMA model (periodic in training, `arflow evaluate`).

    The generated set has num_samples images; sample i has its own noise seed derived from
    (seed, i) and a label from `labels`: "balanced" gives class i % num_classes (every block of
    the set is class-balanced), "random" draws it uniformly from a generator keyed by (seed, i),
    as the public release's evaluation does. Either way a sample depends on (seed, i) and the
    weights only, so the set is the same for every world size and batch size.
    """

    every: int = 0
    """Training steps between periodic evaluations; 0 = never."""
    num_samples: int = 50_000
    """Size of the generated set."""
    batch_size: int = 64
    """Per rank, for sampling, VAE decoding and Inception features."""
    seed: int = 0
    """Seed of the set: sample i's noise (and random label) derive from (seed, i)."""
    labels: Literal["balanced", "random"] = "balanced"
    """"balanced": sample i has class i % num_classes; "random": drawn uniformly (the
    release's evaluation)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """How the set is sampled."""
    reference: str | None = None
    """Statistics .npz (keys mu, sigma: `arflow fid reference` or an ADM reference batch);
    null computes the Inception Score only."""
    inception_weights: str | None = None
    """torch-fidelity InceptionV3 weights file; null = torch-fidelity's cache (downloaded there
    only when the machine is online)."""
    vae: str | None = None
    """Local diffusers AutoencoderKL folder that decodes latents (sample grids too); its own
    config.json gives the latent scale (checked against the data manifest in training)."""
    is_splits: int = 10
    """Inception Score splits."""

    def __post_init__(self):
        _check(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _check(self.num_samples >= 1, "eval.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.seed >= 0, "eval.seed", f"must be >= 0, got {self.seed}")
        _check(
            self.labels in ("balanced", "random"),
            "eval.labels",
            f"must be 'balanced' or 'random', got {self.labels!r}",
        )
        _check(
            1 <= self.is_splits <= self.num_samples,
            "eval.is_splits",
            f"must lie in [1, num_samples={self.num_samples}], got {self.is_splits}",
        )


@dataclass
class Config:
    """A training run: every section of the schema."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------------------ derived
    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run.dir.rstrip('/')}/checkpoints"

    def grad_accumulation(self, world_size: int) -> int:
        return self.train.global_batch_size // (world_size * self.train.micro_batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --------------------------------------------------------------------------- validation
    def validate(self, world_size: int = 1) -> Config:
        """Check combinations; raises ConfigError naming the key. Returns self."""
        t, m = self.train, self.model
        _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
        _check(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _check(world_size >= 1, "world_size", "must be >= 1")
        per_step = world_size * t.micro_batch_size
        _check(
            t.global_batch_size >= per_step and t.global_batch_size % per_step == 0,
            "train.global_batch_size",
            f"{t.global_batch_size} is not a positive multiple of world size ({world_size}) x "
            f"train.micro_batch_size ({t.micro_batch_size}) = {per_step}",
        )
        _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
        try:
            arch = m.architecture()
        except ValueError as e:
            raise ConfigError(f"model.name: {e}") from None
        _check(
            m.input_size % arch["patch_size"] == 0,
            "model.input_size",
            f"{m.input_size} is not divisible by the patch size {arch['patch_size']} of {m.name}",
        )
        _check(
            arch["hidden_size"] % arch["num_heads"] == 0,
            "model.num_heads",
            f"hidden size {arch['hidden_size']} is not divisible by {arch['num_heads']} heads",
        )
        for key in (
            "depth",
            "hidden_size",
            "num_heads",
            "input_size",
            "in_channels",
            "num_classes",
        ):
            value = getattr(m, key)
            _check(value is None or value >= 1, f"model.{key}", f"must be >= 1, got {value}")
        _check(0 <= m.class_dropout_prob < 1, "model.class_dropout_prob", "must lie in [0, 1)")
        _check(self.data.seq_len >= 1, "data.seq_len", "must be >= 1")
        _check(self.data.num_workers >= 0, "data.num_workers", "must be >= 0")
        d = self.data
        _check(
            d.url == "synthetic" or d.num_workers <= t.micro_batch_size,
            "data.num_workers",
            f"{d.num_workers} loader workers, but each contributes whole sequences to every "
            f"micro-batch of train.micro_batch_size = {t.micro_batch_size}; use at most that many",
        )
        _check(
            d.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {d.prefetch_factor}"
        )
        _check(
            d.min_per_class is None or d.min_per_class >= d.seq_len,
            "data.min_per_class",
            f"must be null or >= data.seq_len ({d.seq_len}), got {d.min_per_class}",
        )
        _check(d.max_bad_samples >= 0, "data.max_bad_samples", "must be >= 0")
        for key in ("storage_connect_timeout", "storage_read_timeout"):
            value = getattr(d, key)
            _check(
                0 < value < float("inf"), f"data.{key}", f"must be a positive number, got {value}"
            )
        _check(d.storage_attempts >= 1, "data.storage_attempts", "must be >= 1")
        o = self.optim
        _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        _check(o.eps > 0, "optim.eps", f"must be > 0 (it guards a division), got {o.eps}")
        _check(
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            "optim.betas",
            f"must be two numbers in [0, 1), got {o.betas}",
        )
        _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
        _check(0 <= self.ema.decay < 1, "ema.decay", f"must lie in [0, 1), got {self.ema.decay}")
        p = self.parallel
        _check(
            p.zero_stage in (1, 2, 3),
            "parallel.zero_stage",
            f"must be 1, 2 or 3, got {p.zero_stage}",
        )
        _check(
            not (p.compile is True and p.backend == "deepspeed" and p.zero_stage == 3),
            "parallel.compile",
            "DeepSpeed ZeRO-3 gathers each module's parameters in hooks that torch.compile "
            "cannot trace; use zero_stage 1 or 2, or the fsdp2 backend (sharded like ZeRO-3, "
            "compiled per block), or compile false",
        )
        _check(
            p.collective_timeout_s > 0,
            "parallel.collective_timeout_s",
            f"must be > 0, got {p.collective_timeout_s}",
        )
        _check(self.run.seed >= 0, "run.seed", f"must be >= 0, got {self.run.seed}")
        c = self.checkpoint
        _check(c.every >= 0, "checkpoint.every", "must be >= 0")
        _check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _check(self.logging.every >= 1, "logging.every", "must be >= 1")
        _check(
            self.logging.peak_tflops is None or self.logging.peak_tflops > 0,
            "logging.peak_tflops",
            f"must be null or > 0, got {self.logging.peak_tflops}",
        )
        s = self.samples
        _check(s.every >= 0, "samples.every", "must be >= 0")
        _check(s.per_class >= 1, "samples.per_class", "must be >= 1")
        _check(
            all(0 <= k < m.num_classes for k in s.classes),
            "samples.classes",
            f"class ids must lie in [0, {m.num_classes - 1}]",
        )
        _check(
            not self.eval.every or m.in_channels in (1, 3) or self.eval.vae is not None,
            "eval.vae",
            f"the model works on {m.in_channels}-channel latents: FID needs the local "
            f"AutoencoderKL folder that decodes them",
        )
        return self


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ------------------------------------------------------------------------------------ parsing
def _type_name(tp) -> str:
    """How an annotation reads in an error: `int`, `bool or 'auto'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _shown(value: Any) -> str:
    """A value as an error message quotes it: a 4,000-digit integer is not printed whole."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp` (JSON types only); ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{key}: expected {_type_name(tp)}, got {_shown(value)}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {_shown(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {_shown(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected an object, got {type(value).__name__} {_shown(value)}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"{key}: expected true/false, got {type(value).__name__} {_shown(value)}"
            )
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{key}: expected an integer, got {type(value).__name__} {_shown(value)}"
            )
        if not -(2**63) <= value < 2**63:  # torch, numpy and the file formats hold 64 bits
            raise ConfigError(f"{key}: {_shown(value)} does not fit in a 64-bit integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{key}: expected a number, got {type(value).__name__} {_shown(value)}"
            )
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{key}: {_shown(value)} is beyond the float range") from None
        if not math.isfinite(number):  # JSON (and --set) accept Infinity and NaN
            raise ConfigError(f"{key}: must be a finite number, got {_shown(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(
                f"{key}: expected a string, got {type(value).__name__} {_shown(value)}"
            )
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


def _from_dict(cls, data: Any, prefix: str = ""):
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key (known keys of {where}: {', '.join(sorted(names))})")
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # A section's own checks name the key from its section name on ("sampler.steps: ...");
        # put the path of the section's parent in front ("eval.sampler.steps: ...").
        parent = prefix.rpartition(".")[0]
        raise ConfigError(f"{parent}.{e}" if parent else str(e)) from None


def _check_depth(data: Any, where: str) -> None:
    """Refuse objects and lists nested deeper than MAX_DEPTH (iteratively: no recursion)."""
    stack = [(data, where, 1)]
    while stack:
        node, path, depth = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node)
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        for key, child in children:
            if isinstance(child, (dict, list)):
                inner = f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}"
                stack.append((child, inner.removeprefix("."), depth + 1))


def _parse_json(text: str, where: str) -> Any:
    """JSON text -> value; every way it can fail is a ConfigError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON: {e}") from None
    except RecursionError:  # json recurses once per level of nesting
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's conversion limit
        raise ConfigError(f"{where}: invalid JSON: {e}") from None


def _parse_value(text: str, key: str) -> Any:
    """`--set` values are JSON when they parse as JSON (numbers, true, null, lists), else strings."""
    try:
        return json.loads(text)
    except RecursionError:  # json recurses once per level of nesting
        raise ConfigError(f"{key}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # not JSON, or an integer beyond Python's conversion limit
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides to a raw config dict (in place); returns it."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        *parents, leaf = key.split(".")
        node = data
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"{'.'.join(parents[: i + 1])}: is not an object, cannot set {key}"
                )
        node[leaf] = _parse_value(text, key)
    return data


def config_from_dict(data: dict) -> Config:
    """Typed Config from a raw dict; unknown keys, wrong types, nesting deeper than MAX_DEPTH
    and step counts beyond MAX_STEP raise ConfigError naming the key."""
    if isinstance(data, dict):
        _check_depth(data, "")
    cfg = _from_dict(Config, data)
    for key in STEP_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(
            value <= MAX_STEP,
            key,
            f"{value:,} exceeds {MAX_STEP:,}, the largest step that checkpoint names "
            f"(step_%09d) hold",
        )
    return cfg


def resolve_config(name_or_path: str | Path) -> Path:
    """The file a `--config` argument names: an existing path, else a shipped config's name
    (`xl_256` or `xl_256.json`, see `shipped_config_names()`)."""
    path = Path(name_or_path)
    if path.exists() or len(path.parts) != 1:
        return path
    shipped = SHIPPED_CONFIGS / f"{path.name.removesuffix('.json')}.json"
    return shipped if shipped.is_file() else path


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json"))


def read_config_file(name_or_path: str | Path) -> dict:
    """The raw JSON object of a config file (see `resolve_config`); a missing file, a
    directory, bytes that are not UTF-8, invalid JSON (or nested beyond what the parser can
    recurse into), or a top level that is not an object raise ConfigError naming the file."""
    path = resolve_config(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist (shipped configs: "
            f"{', '.join(shipped_config_names())})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r})"
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    data = _parse_json(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a JSON config file (a path or a shipped config's name), apply `--set` overrides and
    check keys and types."""
    return config_from_dict(apply_overrides(read_config_file(path), list(overrides)))
