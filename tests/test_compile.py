"""parallel.compile: torch.compile per block (and the final layer) in the parallelize step, under
every backend, in one process on the CPU.

Compiled and eager training from the same weights and batches give the same losses within fp32
tolerance; after the first step nothing is compiled again (dynamo's error_on_recompile and its
graph counter). The blocks compile with fullgraph=True, so a graph break would fail the first
step. Compiling takes tens of seconds on a CPU; the backends share one process, so the graphs
compiled for the first are reused by the others.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_MODEL_CONFIG
from torch._dynamo.utils import counters

STEPS = 3
MODEL = TINY_MODEL_CONFIG


def config(parallel: dict, compile: bool | str):
    from arflow.config import config_from_dict

    return config_from_dict(
        {
            "model": MODEL,
            "data": {"seq_len": 3},
            "samples": {"classes": [0, 1]},
            "train": {"global_batch_size": 4, "micro_batch_size": 2},  # 2 micro-batches
            "parallel": {**parallel, "compile": compile, "precision": "fp32", "device": "cpu"},
        }
    ).validate()


def train(cfg, info) -> tuple[list[float], object]:
    """STEPS steps from seed-0 weights on fixed batches; returns the losses and the model.
    Everything after the first step runs with recompilation as an error."""
    from arflow.distributed.parallelize import build_backend
    from arflow.flow.transport import training_loss
    from arflow.models import ARFlow

    torch.manual_seed(0)
    module = ARFlow(**cfg.model.architecture())
    backend = build_backend(module, cfg, info)
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 3, 1, 8, 8, generator=g), torch.randint(4, (4,), generator=g)
        torch.manual_seed(100 + step)  # noise levels, noise and label dropout
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            result = backend.train_step([(x[:2], y[:2]), (x[2:], y[2:])], training_loss, 1e-3)
        assert not result.skipped
        losses.append(result.loss.item())
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "compiled again after the first step"
    return losses, module


def compiled_forward(module) -> bool:
    return hasattr(module.forward, "_torchdynamo_orig_callable")  # what torch.compile returns


@pytest.mark.parametrize(
    "parallel",
    [
        pytest.param({"backend": "ddp"}, id="ddp"),
        # torchtitan's order: recompute, then compile, then fully_shard per block.
        pytest.param({"backend": "fsdp2", "activation_checkpointing": True}, id="fsdp2-ac"),
        pytest.param({"backend": "deepspeed", "zero_stage": 2}, id="deepspeed-zero2"),
    ],
)
def test_compiled_blocks_train_like_eager_without_recompiling(process_group, parallel):
    eager, plain = train(config(parallel, False), process_group)
    compiled, module = train(config(parallel, True), process_group)
    assert not any(compiled_forward(m) for m in [*plain.blocks, plain.final_layer])
    assert all(compiled_forward(m) for m in [*module.blocks, module.final_layer])
    assert counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # Parameter names are the plain model's (checkpoints and the EMA rely on them).
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_compile_setting_resolves_per_device_and_backend():
    from arflow.config import ConfigError
    from arflow.distributed.parallelize import compile_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    ddp, zero3 = {"backend": "ddp"}, {"backend": "deepspeed", "zero_stage": 3}
    assert not compile_enabled(config(ddp, "auto"), cpu)
    assert compile_enabled(config(ddp, "auto"), cuda)
    assert not compile_enabled(config(zero3, "auto"), cuda)  # its hooks cannot be compiled
    assert compile_enabled(config(ddp, True), cpu) and not compile_enabled(config(ddp, False), cuda)
    with pytest.raises(ConfigError, match="parallel.compile: DeepSpeed ZeRO-3"):
        config(zero3, True)
