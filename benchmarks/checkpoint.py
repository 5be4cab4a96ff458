#!/usr/bin/env python
"""What checksums cost a checkpoint save; prints one JSON document.

    python benchmarks/checkpoint.py                         # ARFlow-B/2, 256 px latents
    python benchmarks/checkpoint.py --model ARFlow-S/2 --repeats 2   # a quick rehearsal

One process, the DDP backend (torch DCP files), AdamW state after one step, and the EMA. Three
ways to write the same state, each timed `--repeats` times (median):
  - `plain`: what saving did before checksums: DCP, the rank file and the EMA written
    directly, no checksum, no fsync of the data files;
  - `checked`: the checkpoint component's save (sizes and SHA-256 computed while writing,
    data files fsync'd before meta.json commits them);
  - `hash_after`: `plain` plus hashing every file by reading it back (the alternative to
    hashing while writing).
`overhead_pct` compares `checked` with `plain`; `fsync_s` is the part of it spent in fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ARFlow-B/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from arflow.config import config_from_dict
    from arflow.distributed.checkpoint import CheckpointManager
    from arflow.distributed.env import init_distributed
    from arflow.distributed.parallelize import build_backend
    from arflow.models import ARFlow, architecture_of
    from arflow.utils import integrity
    from arflow.utils.integrity import file_record, list_files
    from arflow.utils.rng import rng_state

    info = init_distributed("cpu")
    cfg = config_from_dict(
        {
            "model": {
                "name": args.model,
                "input_size": args.input_size,
                "in_channels": args.in_channels,
            },
            "train": {"global_batch_size": 1, "micro_batch_size": 1},
            "parallel": {"backend": "ddp"},
        }
    ).validate(1)
    torch.manual_seed(0)
    model = ARFlow(**cfg.model.architecture())
    backend = build_backend(model, cfg, info)
    for p in backend.trainable.values():  # AdamW state as after a step
        p.grad = torch.randn_like(p) * 1e-3
    backend.optimizer.step()
    ema_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    arch = architecture_of(model)
    rank_state = {"rng": rng_state(), "data": {"index": 1}}

    base = Path(args.dir or tempfile.mkdtemp(prefix="arflow-ckpt-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    fsync_time = [0.0]
    real_fsync = os.fsync

    def timed_fsync(fd):
        t = time.perf_counter()
        real_fsync(fd)
        fsync_time[0] += time.perf_counter() - t

    def plain(target: Path) -> None:
        (target / "trainer").mkdir(parents=True)
        torch.save(rank_state, target / "trainer" / "rank_00000.pt")
        save_file(ema_state, str(target / "ema.safetensors"))
        dcp.save(backend._state(), checkpoint_id=str(target))
        (target / "meta.json").write_text(json.dumps({"step": 1}))

    def hash_after(target: Path) -> None:
        plain(target)
        for rel in list_files(str(target)):
            file_record(str(target / rel))

    results = {"plain": [], "hash_after": [], "checked": [], "fsync_s": []}
    manager = CheckpointManager(str(base / "checked"), info, keep_last=1)
    for i in range(args.repeats):
        for name, fn in (("plain", plain), ("hash_after", hash_after)):
            target = base / f"{name}_{i}"
            t0 = time.perf_counter()
            fn(target)
            results[name].append(time.perf_counter() - t0)
        fsync_time[0] = 0.0
        os.fsync = integrity.os.fsync = timed_fsync
        t0 = time.perf_counter()
        manager.save(
            i + 1,
            write_state=backend.save_state,
            rank_state=rank_state,
            ema=ema_state,
            arch=arch,
            config=cfg.to_dict(),
            world_size=1,
        )
        results["checked"].append(time.perf_counter() - t0)
        os.fsync = integrity.os.fsync = real_fsync
        results["fsync_s"].append(fsync_time[0])

    size = sum(os.path.getsize(base / "plain_0" / rel) for rel in list_files(str(base / "plain_0")))
    median = {k: statistics.median(v) for k, v in results.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "params": sum(p.numel() for p in model.parameters()),
                "checkpoint_bytes": size,
                "repeats": args.repeats,
                "seconds": {k: round(v, 4) for k, v in median.items()},
                "overhead_pct": round(100 * (median["checked"] / median["plain"] - 1), 1),
                "hash_after_overhead_pct": round(
                    100 * (median["hash_after"] / median["plain"] - 1), 1
                ),
                "checked_GB_per_s": round(size / 1e9 / max(median["checked"], 1e-9), 3),
            },
            indent=2,
        )
    )
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
