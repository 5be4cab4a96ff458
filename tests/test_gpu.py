"""Checks that only a CUDA GPU can run (benchmarks/gpu_suite.sh runs them with `pytest -m gpu`):
the flash-attn and SDPA intra-image kernels agree, the parallel (training) and recurrent
(sampling) forms agree under bf16 autocast, and a small model learns the digits in bf16 with
compiled blocks under DeepSpeed ZeRO-2 and FSDP2, one process over NCCL, through the launcher.
Without CUDA every test here is skipped with that reason."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from test_distributed import ROOT, command, env, losses, tiny_config
from tiny_models import err_ratio, heads_scaled, randomize, sequence, tiny_model

from arflow.models import hybrid_attention
from arflow.models.hybrid_attention import HybridAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BF16 = dict(device_type="cuda", dtype=torch.bfloat16)


def attention_pass(module, h, c):
    """Output, final state and input gradients of one bf16 forward/backward of `module`."""
    h, c = h.clone().requires_grad_(), c.clone().requires_grad_()
    with torch.autocast(**BF16):
        out, state = module(h, c)
    probe = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    (out.float() * probe).sum().backward()
    return out, state, h.grad, c.grad


@pytest.mark.skipif(
    hybrid_attention.flash_attn_func is None,
    reason="flash-attn is not installed: PyTorch SDPA is the only intra-image kernel",
)
def test_flash_attn_path_equals_sdpa_path_in_bf16(monkeypatch):
    """XL/2's head size (64) and tokens per image (256): output, state and gradients."""
    module = heads_scaled(randomize(HybridAttention(128, 2), seed=0, std=0.3)).cuda()
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 256, 128, generator=gen).cuda()
    c = torch.randn(2, 3, 128, generator=gen).cuda()
    flash = attention_pass(module, h, c)
    monkeypatch.setattr(hybrid_attention, "flash_attn_func", None)
    sdpa = attention_pass(module, h, c)
    for name, a, b in zip(("output", "state", "grad h", "grad c"), flash, sdpa):
        assert err_ratio(a, b) < 1e-2, f"{name}: flash-attn vs SDPA err ratio {err_ratio(a, b)}"


def test_parallel_form_equals_recurrent_form_in_bf16():
    """The training forward over a whole sequence and the sampler's image-by-image steps give
    the same velocities under bf16 autocast on CUDA, and both stay near the fp32 forward."""
    model = tiny_model(seed=1, input_size=16, hidden_size=128, num_heads=2, num_classes=5).cuda()
    x, t, y = (a.cuda() for a in sequence(batch=2, images=5, size=16, seed=2))
    with torch.no_grad():
        exact = model(x, t, y)
        with torch.autocast(**BF16):
            parallel = model(x, t, y)
            state, steps = None, []
            for s in range(x.shape[1]):
                v, state = model.step(x[:, s], t[:, s], y, state)
                steps.append(v)
    recurrent = torch.stack(steps, dim=1)
    assert parallel.dtype == torch.bfloat16  # autocast really ran
    assert all(layer.dtype == torch.float32 for layer in state.layers)  # the state stays fp32
    assert err_ratio(recurrent, parallel) < 1e-2
    assert err_ratio(parallel, exact) < 4e-2 and err_ratio(recurrent, exact) < 4e-2


def train_digits(tmp: Path, shards: str, backend: str, device: str) -> tuple[list[float], str]:
    """30 steps of a small model on the digits in bf16 with compiled blocks, one process;
    returns the per-step losses and the job's stderr."""
    cfg = tiny_config(
        tmp,
        backend,
        zero_stage=2,
        model={"in_channels": 3, "num_classes": 10},
        data={"url": shards, "num_workers": 0},
        train={"steps": 30},
        optim={"lr": 2e-3, "warmup_steps": 0, "schedule": "constant"},
        parallel={"device": device, "precision": "bf16", "compile": True},
    )
    proc = subprocess.run(
        command("python", 1, cfg),
        cwd=ROOT,
        env=dict(env(), TORCH_LOGS="recompiles"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    per_step = losses(tmp / "run")
    return [per_step[s] for s in sorted(per_step)], proc.stderr


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_small_model_learns_in_bf16_with_compile(tmp_path, digits_shards, backend):
    values, stderr = train_digits(tmp_path, digits_shards, backend, "cuda")
    assert len(values) == 30 and all(math.isfinite(v) for v in values), values
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < 0.9 * first, f"loss did not fall: first 10 steps {first:.4f}, last 10 {last:.4f}"
    assert "Recompiling function" not in stderr, "compiled blocks were recompiled during training"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(r.get("skipped_steps", 0) == 0 for r in records)


def test_background_checkpoint_copies_are_pinned_complete_and_reused():
    """A background save's host copy of CUDA state (arflow.distributed.staging): pinned buffers,
    complete when the stager returns (the training step may change the originals at once) and
    the same buffers at the next save."""
    from arflow.distributed.staging import HostStager

    gen = torch.Generator("cuda").manual_seed(0)
    state = {
        "w": torch.randn(1024, 1024, device="cuda", generator=gen),
        "opt": [{"step": 3, "m": torch.randn(4096, device="cuda", generator=gen)}],
    }
    expected = {"w": state["w"].cpu(), "m": state["opt"][0]["m"].cpu()}
    stager = HostStager()
    copy = stager(state, "state")
    state["w"].mul_(2)  # queued at once after the copies: an unfinished copy would see it
    state["opt"][0]["m"].zero_()
    assert copy["w"].is_pinned() and copy["opt"][0]["m"].is_pinned()
    assert torch.equal(copy["w"], expected["w"]) and torch.equal(copy["opt"][0]["m"], expected["m"])
    again = stager(state, "state")
    assert again["w"].data_ptr() == copy["w"].data_ptr()
    assert torch.equal(again["w"], state["w"].cpu()) and not again["opt"][0]["m"].any()
