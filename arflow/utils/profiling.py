"""The `train.profile` window: a torch.profiler trace of chosen training steps, and on CUDA the
allocator's history over the same steps.

Every rank writes its own files under `<run.dir>/profile/`:
- `rank<R>.<time>.pt.trace.json`: the Chrome trace of the window (chrome://tracing, Perfetto,
  or TensorBoard's profiler plugin pointed at the folder). Its `ProfilerStep#k` spans are the
  window's steps, one per optimizer step including whatever followed it (logging, saving);
- `rank<R>_memory_steps_<first>-<last>.pickle` (CUDA): the allocation history with stack
  traces, for https://pytorch.org/memory_viz.
The step before the window warms the profiler up (not recorded), so that its start-up cost does
not land in the first recorded step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from arflow.config import ProfileConfig
from arflow.internals.torch import dump_memory_history, start_memory_history

MEMORY_HISTORY_ENTRIES = 100_000  # allocation events kept (the newest)


class ProfileWindow:
    """Call `before_step(n)` before optimizer step n runs and `after_step(n)` once it is done;
    `close()` when the loop ends (writes a window the run left early). Records steps start ..
    start + steps - 1 of `cfg`; a run that resumes after the window's first step skips it."""

    def __init__(self, cfg: ProfileConfig, directory: Path, rank: int, device: torch.device):
        self.first, self.last = cfg.start, cfg.start + cfg.steps - 1
        self.directory, self.rank = directory, rank
        self.cuda = device.type == "cuda"
        self.profiler: profile | None = None
        self.recorded: list[int] = []

    def before_step(self, step: int) -> None:
        if self.profiler is None and self.first <= self.last:
            if step == self.first - 1:
                self._start(warmup=1)
            elif step == self.first:
                self._start(warmup=0)  # the run starts (or resumes) at the window
        if self.cuda and step == self.first and self.profiler is not None:
            start_memory_history(MEMORY_HISTORY_ENTRIES)

    def _start(self, warmup: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=warmup, active=self.last - self.first + 1, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(self.directory), f"rank{self.rank}"),
            record_shapes=True,
            profile_memory=True,
            with_stack=False,  # stacks make the traces of large models too big to open
        )
        self.profiler.start()

    def after_step(self, step: int) -> None:
        if self.profiler is None:
            return
        if step >= self.first:
            self.recorded.append(step)
        if step >= self.last:
            self.close()
        else:
            self.profiler.step()

    def close(self) -> None:
        """Stop a running window: its trace (and memory history) hold the steps recorded."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        if self.cuda and self.recorded:
            first, last = self.recorded[0], self.recorded[-1]
            dump_memory_history(
                self.directory / f"rank{self.rank}_memory_steps_{first}-{last}.pickle"
            )
