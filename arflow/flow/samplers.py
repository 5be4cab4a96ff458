"""Autoregressive samplers: every denoising step is one image-chunk.

At step i the model sees the current x at time t_i, reads the state left by steps < i, and
returns the velocity together with the state advanced by this chunk. That state is committed
once per step; extra evaluations inside a step (Heun's corrector) read the same state and their
new state is discarded. The hybrid model's state has a fixed size, so a step costs the same at
step 1 and 250; the causal_softmax ablation's state is a key/value cache that grows by one image
per step (see models/causal_attention.py). `memory=False` gives every step an empty state: SiT's
memoryless sampler, for a model trained on single images (sequences of n = 1).

Methods (linear path, t = 0 noise -> t = 1 data):
- "sde": SiT's default Euler-Maruyama with diffusion w(t) = 1 - t on t in [0, 1 - last_step_size]
  (`steps` points, so steps - 1 stochastic steps) and a final deterministic 'Mean' step of
  size `last_step_size`; drift = v + w(t) * score, score = (t v - x) / (1 - t).
- "euler", "heun": the probability-flow ODE dx/dt = v on `steps` uniform steps over [0, 1].

Classifier-free guidance runs cond and uncond in one batch of 2B (the uncond half uses the null
class and its own state) and mixes v_u + scale (v_c - v_u), on the first `cfg_channels` channels
only when set (3, as the reference does for SD latents) and on all channels when None; the
remaining channels keep the conditional velocity. A scale of 1 skips the uncond half.

Noise is drawn per sample from a generator seeded with that sample's seed, so a sample depends
on its label, seed and the weights only, not on which other samples share its batch.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..config import SamplerConfig
from ..models.arflow import ARFlow, ARFlowState

METHODS = typing.get_args(typing.get_type_hints(SamplerConfig)["method"])


@contextlib.contextmanager
def sampling_precision(precision: str, device: torch.device):
    """The numerics of `SamplerConfig.precision` on `device`, restored on exit.

    "auto" is "bf16" on CUDA and "fp32" elsewhere. "bf16": autocast with TF32 matmuls (the
    hybrid attention keeps its inter-image state in fp32 under autocast); "tf32": fp32 with TF32
    matmuls and convolutions; "fp32": TF32 off. Only CUDA has TF32 and bf16 here; on other
    devices every setting runs fp32.
    """
    if device.type != "cuda":
        yield
        return
    if precision == "auto":
        precision = "bf16"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class GuidedVelocity:
    """The velocity field the samplers integrate: model.step with optional CFG.

    Calling it with (x (B, C, H, W), t float, state) returns (v (B, C, H, W), state advanced by
    this chunk); the caller decides whether to commit that state. With memory=False the model
    reads an empty state at every call.
    """

    def __init__(
        self, model: ARFlow, labels: torch.Tensor, config: SamplerConfig, memory: bool = True
    ):
        self.model = model
        self.config = config
        self.memory = memory
        if config.guided:
            null = torch.full_like(labels, model.null_class)
            labels = torch.cat([labels, null])
        self.labels = labels

    def __call__(
        self, x: torch.Tensor, t: float, state: ARFlowState | None
    ) -> tuple[torch.Tensor, ARFlowState]:
        cfg = self.config
        if cfg.guided:
            x = torch.cat([x, x])
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        if not self.memory:
            state = None
        v, state = self.model.step(x.to(self.model.pos_embed.dtype), tt, self.labels, state)
        v = v.float()
        if cfg.guided:
            cond, uncond = v.chunk(2)
            k = cond.shape[1] if cfg.cfg_channels is None else min(cfg.cfg_channels, cond.shape[1])
            guided = uncond[:, :k] + cfg.cfg_scale * (cond[:, :k] - uncond[:, :k])
            v = torch.cat([guided, cond[:, k:]], dim=1)
        return v, state


class SampleNoise:
    """Gaussian noise drawn per sample from generators seeded by the samples' seeds."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device):
        self.shape = shape
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def draw(self) -> torch.Tensor:
        """(B, *shape) standard normal, row b from generator b."""
        return torch.stack(
            [torch.randn(self.shape, generator=g, device=self.device) for g in self.generators]
        )


def sde_steps(velocity: GuidedVelocity, x, noise: SampleNoise, config: SamplerConfig):
    """Euler-Maruyama with w(t) = 1 - t, then one deterministic 'Mean' step. Yields per step."""
    times = torch.linspace(0.0, 1.0 - config.last_step_size, config.steps).tolist()
    state = None

    def drift(x, t, state):
        v, new_state = velocity(x, t, state)
        score = (t * v - x) / (1.0 - t)
        return v + (1.0 - t) * score, new_state

    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        d, state = drift(x, t, state)
        x = x + d * dt + (2.0 * (1.0 - t) * dt) ** 0.5 * noise.draw()
        yield x
    d, state = drift(x, times[-1], state)
    yield x + d * config.last_step_size


def ode_steps(velocity: GuidedVelocity, x, config: SamplerConfig):
    """Fixed-step Euler or Heun on [0, 1]. Heun's corrector reads the committed state only."""
    times = torch.linspace(0.0, 1.0, config.steps + 1).tolist()
    state = None
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        v, next_state = velocity(x, t, state)
        if config.method == "heun":
            v_end, _ = velocity(x + dt * v, t_next, state)  # same state: not committed
            v = 0.5 * (v + v_end)
        x = x + dt * v
        state = next_state
        yield x


@torch.no_grad()
def sample(
    model: ARFlow,
    labels: torch.Tensor,
    seeds: Sequence[int],
    config: SamplerConfig | None = None,
    progress: bool = False,
    memory: bool = True,
) -> torch.Tensor:
    """Draw one image per (label, seed).

    labels: (B,) class ids; seeds: B integers -> (B, C, H, W) fp32 in the model's data space
    (pixels in [-1, 1], or scaled VAE latents). config: SamplerConfig() (the reference's SDE,
    250 steps) when None. The model is put in eval mode for the call (no label dropout) and
    restored afterwards. memory=False: every step reads an empty state (SiT's sampler, for a
    model trained on single images).
    """
    config = config or SamplerConfig()
    if labels.ndim != 1 or len(seeds) != labels.shape[0]:
        raise ValueError(
            f"need labels of shape (B,) and B seeds, got labels {tuple(labels.shape)} "
            f"and {len(seeds)} seeds"
        )
    device = model.pos_embed.device
    shape = (model.in_channels, model.input_size, model.input_size)
    noise = SampleNoise(seeds, shape, device)
    velocity = GuidedVelocity(model, labels.to(device), config, memory)
    x = noise.draw()
    steps = (
        sde_steps(velocity, x, noise, config)
        if config.method == "sde"
        else ode_steps(velocity, x, config)
    )
    was_training = model.training
    model.eval()
    try:
        with sampling_precision(config.precision, device):
            for x in tqdm(steps, total=config.steps, disable=not progress, desc="sampling"):  # noqa: B007 (the last iterate is the sample)
                pass
    finally:
        model.train(was_training)
    return x
