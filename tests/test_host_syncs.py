"""Outside log steps a training step reads back from the device once: the one small all-reduce
that decides, on every rank alike, whether to skip the update and whether to stop.

Counted for real, in-process on the CPU: a TorchFunctionMode sees every host read of a tensor's
value (`item`, `tolist`, `bool`, `float`, `int`, `numpy`): on a GPU each one waits for the
device. Reads that touch host memory on a GPU run too are not syncs and are not counted: torch's
AdamW keeps its step counters on the host, and the model checks labels only when they are on
the CPU (the test's labels are; a GPU run's are not).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_distributed import tiny_config
from torch.overrides import TorchFunctionMode

HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
}
# (file path suffix, function) of reads that read host memory on a GPU run as well.
HOST_SIDE = {
    ("torch/optim/optimizer.py", "_get_value"),  # AdamW's step counter (a host tensor)
    ("arflow/models/arflow.py", "check_labels"),  # only called for labels on the CPU
}


class HostReads(TorchFunctionMode):
    """Host reads of tensor values, by the step that was running (`step` is set by the caller)
    and where they happened."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.reads: Counter = Counter()
        self.where: dict[int, list[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            caller = sys._getframe(1)
            path = Path(caller.f_code.co_filename).as_posix()
            if not any(path.endswith(f) and caller.f_code.co_name == n for f, n in HOST_SIDE):
                self.reads[self.step] += 1
                self.where.setdefault(self.step, []).append(
                    f"{path}:{caller.f_lineno} {caller.f_code.co_name}"
                )
        return func(*args, **(kwargs or {}))


STEPS = 6  # logged, saved and evaluated at step 6 only

CASES = [
    pytest.param("ddp", {}, id="ddp"),
    pytest.param("fsdp2", {}, id="fsdp2"),
    # bf16 with clipping by value: DeepSpeed then checks nothing itself (in fp32 mode, or with
    # clipping by norm, its own step reads the gradient norm's validity on the host each step).
    pytest.param("deepspeed", {"precision": "bf16"}, id="deepspeed-zero2-bf16"),
]


@pytest.mark.parametrize("backend,parallel", CASES)
def test_one_host_sync_per_step_outside_log_steps(tmp_path, process_group, backend, parallel):
    from arflow.config import load_config
    from arflow.train import Trainer

    path = tiny_config(
        tmp_path,
        backend,
        train={"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2},  # 2 micro-batches
        logging={"every": STEPS},
        checkpoint={"every": 0},
        parallel=parallel,
    )
    trainer = Trainer(load_config(path), process_group)
    counter = HostReads()
    step_fn = trainer.backend.train_step

    def counted_step(*args, **kwargs):
        counter.step += 1  # reads from here to the next step's start belong to this step
        return step_fn(*args, **kwargs)

    trainer.backend.train_step = counted_step
    with counter:
        assert trainer.fit() == "done"
    assert counter.step == STEPS
    for step in range(1, STEPS):
        assert counter.reads[step] <= 1, (step, counter.where[step])
    assert counter.reads[STEPS] >= 1  # the log step reads its metrics (the counter sees reads)
