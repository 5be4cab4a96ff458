"""Training metrics: summed on the device between log steps (StepMetrics), then written by
rank 0 (MetricsLogger) to a tqdm bar, `metrics.jsonl` in the run directory, TensorBoard event
files and wandb.

`metrics.jsonl` always works (no service needed). TensorBoard writes under
`<run.dir>/tensorboard/` unless `logging.tensorboard: false`. wandb follows WANDB_MODE when it
is set, runs offline when no API key is configured, and is off with `logging.wandb: false`.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import resource
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from arflow.config import Config, ConfigError


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss_kb / (2**30 if sys.platform == "darwin" else 2**20)


class StepMetrics:
    """The steps since the last log step. Loss and gradient norm are summed on the device, so a
    step costs no host sync; `read` (at log steps) reduces them over ranks and reads them once.
    The step time is the window's wall time over its steps, measured there too (the read waits
    for the device), leaving out time spent `paused` (checkpoints, evaluation). The time spent
    `waiting_for_data` is host wall time only (no sync either).

    On a GPU the host runs ahead of the device by less than a step (each step reads back its
    skip / stop decision), so host time spent waiting for the next batch is, up to the tail of
    the previous step's optimizer update, time the device sat idle."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, grad norm
        self.applied = 0  # steps whose update was applied (skipped ones are not averaged)
        self.steps = 0
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.data_wait = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, applied: bool) -> None:
        """loss: () this rank's mean loss of the step; grad_norm: () global norm."""
        self.steps += 1
        if applied:
            self.applied += 1
            self.sums += torch.stack([loss.detach(), grad_norm.detach()]).double()

    def paused(self):
        """Around what is not step time (checkpoints, evaluation)."""
        return self._timed("excluded")

    def waiting_for_data(self):
        """Around fetching a step's batches and starting their copy to the device."""
        return self._timed("data_wait")

    @contextlib.contextmanager
    def _timed(self, total: str):
        """Adds the block's wall time to the attribute `total`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, total, getattr(self, total) + time.perf_counter() - t0)

    def read(self, bad_samples: int) -> dict[str, float]:
        """Collective. Means over ranks and the window's applied steps (nan if none) of `loss`
        and `grad_norm`, `step_time_s`, `data_wait_fraction`: the ranks' mean time waiting for
        data over the window's wall time, and `data_bad_samples`: the world sum of each rank's
        `bad_samples`. Starts the next window."""
        host = [float(bad_samples), self.data_wait]
        extra = torch.tensor(host, dtype=torch.float64, device=self.device)
        totals = torch.cat([self.sums, extra])
        dist.all_reduce(totals)  # the one collective of a log step
        loss, grad_norm, bad, data_wait = totals.tolist()  # waits for the window's steps
        world = dist.get_world_size()
        wall = time.perf_counter() - self.start - self.excluded
        count = self.applied * world
        out = {
            "loss": loss / count if count else math.nan,
            "grad_norm": grad_norm / count if count else math.nan,
            "step_time_s": wall / max(self.steps, 1),
            "data_wait_fraction": data_wait / world / wall,
            "data_bad_samples": int(bad),
        }
        self.reset()
        return out


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def drop_replayed_rows(path: Path, start_step: int) -> None:
    """Keep in `path` only the rows up to `start_step`, the step the run starts from: later
    rows were logged by a run that died or was rolled back after its checkpoint, and this run
    logs those steps again. They move to `metrics.superseded.jsonl`, so nothing is lost."""
    if not path.exists():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
        (keep if step <= start_step else drop).append(line)
    if not drop:
        return
    with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
        f.writelines(line + "\n" for line in drop)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def tensorboard_writer(directory: Path, start_step: int):
    """A SummaryWriter adding an event file to `directory`. Events of steps after `start_step`
    in earlier files were logged by a run that died or was rolled back after its checkpoint:
    TensorBoard hides them (purge_step), as drop_replayed_rows moves them out of metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            f"logging.tensorboard: needs the tensorboard package (pip install 'arflow[train]'), "
            f"or set logging.tensorboard false ({err})"
        ) from err
    return SummaryWriter(str(directory), purge_step=start_step + 1)


class MetricsLogger:
    """Create on every rank; only rank 0 writes anything."""

    def __init__(self, cfg: Config, is_main: bool, start_step: int, resumed: bool):
        self.enabled = is_main
        self.cfg = cfg
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        if not is_main:
            return
        self.dir = Path(cfg.run.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        drop_replayed_rows(self.dir / "metrics.jsonl", start_step)
        self.file = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run; close())
        if cfg.logging.progress:
            self.bar = tqdm(
                total=cfg.train.steps, initial=start_step, desc=cfg.run.name, dynamic_ncols=True
            )
        if cfg.logging.wandb:
            import wandb

            os.environ.setdefault("WANDB_DIR", str(self.dir))
            id_file = self.dir / "wandb_id"  # one wandb run across resumes
            run_id = (
                id_file.read_text().strip()
                if resumed and id_file.exists()
                else uuid.uuid4().hex[:8]
            )
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=cfg.logging.project,
                name=cfg.run.name,
                tags=cfg.logging.tags,
                config=cfg.to_dict(),
                dir=str(self.dir),
                id=run_id,
                resume="allow",
                mode=wandb_mode(),
            )
        if cfg.logging.tensorboard:
            self.tensorboard = tensorboard_writer(self.dir / "tensorboard", start_step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()  # as metrics.jsonl: a crash loses no logged row

    def log_image(self, step: int, key: str, path: Path, caption: str) -> None:
        if not self.enabled:
            return
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.tensorboard.add_image(key, pixels, step, dataformats="HWC")
            self.tensorboard.flush()

    def progress(self, step: int, postfix: dict | None = None) -> None:
        """Move the bar to `step`; `postfix` (log steps) replaces the figures shown beside it."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
