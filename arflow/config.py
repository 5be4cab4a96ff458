"""The one typed configuration schema of a training run.

A run is described by a JSON file (see `configs/`) plus `--set key.path=value` overrides. Every
section is a dataclass; `load_config` checks every key and type and `Config.validate` checks the
combinations that need the world size, all before any model, data or process group is built.
Errors are `ConfigError`s whose message starts with the offending key path.
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


class ConfigError(ValueError):
    """A configuration problem; the message names the key path (e.g. `train.micro_batch_size`)."""


@dataclass
class RunConfig:
    name: str = "arflow"
    # Output directory: metrics.jsonl, sample grids, wandb files, and checkpoints by default.
    dir: str = "runs/arflow"
    seed: int = 0


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
    # A zoo name "ARFlow-{S,B,L,XL}/{2,4,8}"; depth / hidden_size / num_heads override the zoo's
    # values (small models for CPU runs) and are null to keep them.
    name: str = "ARFlow-XL/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    # "hybrid": the paper's model. "causal_softmax": its attention ablation, one block-causal
    # softmax across the images instead of the linear state (no gt_proj; the sampling state is
    # a key/value cache that grows with every step).
    attention: Literal["hybrid", "causal_softmax"] = "hybrid"

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
    # Directory or fsspec URL (s3://...) of class-bucketed shards with a manifest.json, or
    # "synthetic" for random tensors of the model's shape (benchmarks, smoke tests).
    url: str = "synthetic"
    seq_len: int = 5
    num_workers: int = 2
    class_sampling: Literal["uniform", "proportional"] = "uniform"
    storage_options: dict | None = None
    prefetch_factor: int = 2
    # Classes with fewer samples are dropped with a warning; null: every class must hold at
    # least seq_len samples, else the run stops before training and names them.
    min_per_class: int | None = None
    # Unreadable samples skipped per rank (its workers together) before the run stops; counted
    # since the start (or a resume on another layout) and logged as data_bad_samples.
    max_bad_samples: int = 100
    # Object storage (data, checkpoints and the run lock alike): seconds to connect and to wait
    # for each answer, and attempts per request (retried after about 0.5, 1, 2, 4 s with jitter,
    # longer when the store asks with Retry-After; each retry logged at once). With the defaults
    # an endpoint that accepts connections but never answers fails within about a minute.
    storage_connect_timeout: float = 5.0
    storage_read_timeout: float = 10.0
    storage_attempts: int = 5


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 32
    # The threshold of grad_clip_mode; 0 disables clipping. "value" clamps every gradient
    # element to [-grad_clip, grad_clip] (the public release: 3.0); "norm" rescales the whole
    # gradient to a global L2 norm <= grad_clip. The logged grad_norm is taken before clipping.
    grad_clip: float = 3.0
    grad_clip_mode: Literal["value", "norm"] = "value"
    # Consecutive steps with a non-finite loss or gradient after which the run stops.
    max_nonfinite_steps: int = 10


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.02  # not applied to 1-D parameters (norms, biases, embeddings' bias)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # end of the cosine / linear decay, as a fraction of lr


@dataclass
class EMAConfig:
    decay: float = 0.9999


@dataclass
class ParallelConfig:
    backend: Literal["deepspeed", "fsdp2", "ddp"] = "deepspeed"
    zero_stage: int = 2  # DeepSpeed only: 1, 2 or 3
    # "bf16": bf16 activations (TF32 for what stays fp32); "tf32": fp32 weights and activations
    # with TF32 matmuls, as the public release trains; "fp32": exact. "auto": bf16 on CUDA, fp32
    # on CPU (where tf32 is plain fp32). Master weights and optimizer state are fp32 always.
    precision: Literal["auto", "bf16", "tf32", "fp32"] = "auto"
    activation_checkpointing: bool = False  # per transformer block
    # torch.compile each transformer block and the final layer (one graph each) before the
    # backend wraps or shards them. "auto": on for CUDA, off for CPU (where compiling costs more
    # than a short run gains) and under DeepSpeed ZeRO-3, whose per-module parameter hooks
    # cannot be compiled (true there is refused).
    compile: bool | Literal["auto"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # How long a collective (or barrier) may wait for the other ranks before the process group
    # fails it. A rank that raises stops the others within seconds regardless (see README,
    # "When something fails"); this bounds the rest, e.g. NCCL peers of a rank killed outright.
    # It must exceed the longest legitimate wait: rank 0 converting a checkpoint, a slow save.
    collective_timeout_s: float = 1800.0


@dataclass
class CheckpointConfig:
    dir: str | None = None  # local path or fsspec URL; default <run.dir>/checkpoints
    storage_options: dict | None = None  # fsspec options for a URL (e.g. S3 endpoint_url)
    every: int = 1000  # steps; 0 saves only at the end and on SIGTERM / SIGUSR1
    keep_last: int = 3
    # Write checkpoints in the background: training waits only while the state is copied to
    # host memory (about the checkpoint's size in host RAM per save in flight); false writes
    # in the foreground.
    async_save: bool = True


@dataclass
class LoggingConfig:
    every: int = 50  # steps between metrics.jsonl / wandb records
    progress: bool = True  # rank-0 tqdm bar
    wandb: bool = True  # offline automatically when no credentials are configured
    project: str = "arflow"
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SamplerConfig:
    """How images are sampled: the one settings type of the `samples` and `eval` sections,
    launchers/sample.py and `arflow.flow.samplers.sample`. Defaults are the reference's: SiT's
    SDE with 250 steps, no guidance (CFG on the first 3 channels when scale != 1)."""

    method: Literal["sde", "euler", "heun"] = "sde"
    steps: int = 250  # sde: points on [0, 1 - last_step_size], then the final mean step
    cfg_scale: float = 1.0  # classifier-free guidance; 1 = none
    cfg_channels: int | None = 3  # guide only the first K channels (the reference); null = all
    last_step_size: float = 0.04  # sde only
    # "auto": bf16 autocast with TF32 matmuls on CUDA (the inter-image state stays fp32), fp32 on
    # CPU; "tf32": fp32 activations with TF32 matmuls (the release's sampling); "fp32": exact.
    precision: Literal["auto", "bf16", "tf32", "fp32"] = "auto"

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

    every: int = 0  # steps; 0 = only together with eval.every and at the end of the run
    classes: list[int] = field(default_factory=lambda: list(range(8)))
    per_class: int = 8
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass(frozen=True)
class EvalConfig:
    """FID / Inception Score of the EMA model (periodic in training, launchers/evaluate.py).

    The generated set has num_samples images; sample i has its own noise seed derived from
    (seed, i) and a label from `labels`: "balanced" gives class i % num_classes (every block of
    the set is class-balanced), "random" draws it uniformly from a generator keyed by (seed, i),
    as the public release's evaluation does. Either way a sample depends on (seed, i) and the
    weights only, so the set is the same for every world size and batch size.
    """

    every: int = 0  # training steps between periodic evaluations; 0 = never
    num_samples: int = 50_000
    batch_size: int = 64  # per rank, for sampling, VAE decoding and Inception features
    seed: int = 0
    labels: Literal["balanced", "random"] = "balanced"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # Statistics .npz (keys mu, sigma: tools/fid_reference.py or an ADM reference batch); null
    # computes the Inception Score only.
    reference: str | None = None
    # torch-fidelity InceptionV3 weights file; null = torch-fidelity's cache (downloaded there
    # only when the machine is online).
    inception_weights: str | None = None
    # Local diffusers AutoencoderKL folder that decodes latents (sample grids too); its own
    # config.json gives the latent scale (checked against the data manifest in training).
    vae: str | None = None
    is_splits: int = 10  # Inception Score splits

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
            errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected an object, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # JSON (and --set) accept Infinity and NaN
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
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


def _parse_value(text: str) -> Any:
    """`--set` values are JSON when they parse as JSON (numbers, true, null, lists), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
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
        node[leaf] = _parse_value(text)
    return data


def config_from_dict(data: dict) -> Config:
    """Typed Config from a raw dict; unknown keys and wrong types raise ConfigError."""
    return _from_dict(Config, data)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a JSON config file, apply `--set` overrides and check keys and types."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    return config_from_dict(apply_overrides(data, list(overrides)))
