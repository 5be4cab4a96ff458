"""Gradient clipping by value and by norm, and the tf32 precision, in every backend.

Two processes (torchrun, gloo) train the same tiny model for a few steps with every backend --
DDP, FSDP2, DeepSpeed ZeRO-1, 2 and 3 -- each rank on its half of the global batch; a single
process trains the same model on the whole batch with torch.nn.utils.clip_grad_value_ /
clip_grad_norm_ and torch's AdamW. The weights must agree, the logged gradient norm must be the
norm before clipping, and clipping must be active (the unclipped run ends elsewhere).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_MODEL_CONFIG

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
LR = 1e-2
CLIP = {"value": 2e-3, "norm": 2e-2}  # small enough to clip at every step (asserted)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}  # fp32 reductions in another order
CASES = {
    "ddp": {"backend": "ddp"},
    "fsdp2": {"backend": "fsdp2"},
    "zero1": {"backend": "deepspeed", "zero_stage": 1},
    "zero2": {"backend": "deepspeed", "zero_stage": 2},
    "zero3": {"backend": "deepspeed", "zero_stage": 3},
}
# No random label dropout: the loss is a function of the batch.
MODEL = {**TINY_MODEL_CONFIG, "class_dropout_prob": 0.0}


def config(parallel: dict, mode: str, precision: str = "fp32"):
    from arflow.config import config_from_dict

    return config_from_dict(
        {
            "model": MODEL,
            "train": {
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "grad_clip": CLIP[mode],
                "grad_clip_mode": mode,
            },
            "optim": {"lr": LR, "weight_decay": 0.02},
            "parallel": {**parallel, "precision": precision, "device": "cpu"},
        }
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: x (4, 3, 1, 8, 8), y (4,)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 3, 1, 8, 8, generator=g), torch.randint(4, (4,), generator=g)


def half_loss(model, x, y, step: int, half: int) -> torch.Tensor:
    """The flow-matching loss of one half of the batch, its noise drawn from (step, half)."""
    from arflow.flow.transport import training_loss

    return training_loss(model, x, y, torch.Generator().manual_seed(10 * step + half))


def new_model():
    from arflow.models import ARFlow

    torch.manual_seed(0)
    return ARFlow(**config({"backend": "ddp"}, "value").model.architecture())


def reference(mode: str | None) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """One process, the whole batch, torch's clipping. Returns the weights, the gradient norm
    before clipping and the fraction of gradient elements clipped, per step."""
    from torch.nn.utils import clip_grad_norm_, clip_grad_value_, get_total_norm

    from arflow.distributed.backend import param_groups

    model = new_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    norms, clipped = [], []
    for step in range(STEPS):
        x, y = batch(step)
        loss = (
            half_loss(model, x[:2], y[:2], step, 0) + half_loss(model, x[2:], y[2:], step, 1)
        ) / 2
        loss.backward()
        grads = [p.grad for p in params]
        norms.append(get_total_norm(grads).item())
        if mode == "value":
            flat = torch.cat([g.flatten() for g in grads])
            clipped.append((flat.abs() > CLIP[mode]).float().mean().item())
            clip_grad_value_(params, CLIP[mode])
        elif mode == "norm":
            clipped.append(float(norms[-1] > CLIP[mode]))
            clip_grad_norm_(params, CLIP[mode])
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, clipped


def train_distributed(out: str) -> None:
    """Run under torchrun with 2 processes: every case, then rank 0 saves the results."""
    import torch.distributed as dist

    from arflow.distributed.env import init_distributed, shutdown
    from arflow.distributed.parallelize import build_backend

    info = init_distributed("cpu")
    results = {}
    runs = [(name, mode, "fp32") for name in CASES for mode in ("value", "norm")]
    runs.append(("ddp", "value", "tf32"))
    for name, mode, precision in runs:
        backend = build_backend(new_model(), config(CASES[name], mode, precision), info)
        tf32 = torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        norms = []
        for step in range(STEPS):
            x, y = batch(step)
            part = slice(2 * info.rank, 2 * info.rank + 2)

            def loss_fn(model, x, y, step=step):
                return half_loss(model, x, y, step, info.rank)

            result = backend.train_step([(x[part], y[part])], loss_fn, LR)
            assert not result.skipped
            norms.append(result.grad_norm.item())
        weights = backend.gather_full(backend.master_params())
        results[f"{name}-{mode}-{precision}"] = {
            "weights": {n: w.detach().cpu().clone() for n, w in weights.items()},
            "grad_norms": norms,
            "tf32_flags": tf32,
        }
        dist.barrier()
    if info.is_main:
        torch.save(results, out)
    shutdown()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("clip") / "results.pt"
    from arflow.distributed.env import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        __file__,
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["value", "norm"])
@pytest.mark.parametrize("name", list(CASES))
def test_clipping_matches_torch_on_the_global_batch(distributed_results, name, mode):
    expected, norms, clipped = reference(mode)
    unclipped, _, _ = reference(None)
    assert all(c > 0 for c in clipped), f"clipping must be active at every step: {clipped}"
    got = distributed_results[f"{name}-{mode}-fp32"]
    assert got["grad_norms"] == pytest.approx(norms, rel=1e-4)  # before clipping
    assert not got["tf32_flags"]  # "fp32": exact matmuls
    for n, w in got["weights"].items():
        torch.testing.assert_close(w, expected[n], **TOLERANCE, msg=f"{name} {mode} {n}")
    # The comparison can tell clipped from unclipped training.
    assert not all(torch.allclose(unclipped[n], expected[n], **TOLERANCE) for n in expected)


@pytest.mark.slow
def test_tf32_precision_is_fp32_with_tf32_matmuls(distributed_results):
    got = distributed_results["ddp-value-tf32"]
    assert got["tf32_flags"]
    expected, _, _ = reference("value")  # on CPU tf32 is plain fp32
    for n, w in got["weights"].items():
        torch.testing.assert_close(w, expected[n], **TOLERANCE, msg=n)


if __name__ == "__main__":
    train_distributed(sys.argv[1])
