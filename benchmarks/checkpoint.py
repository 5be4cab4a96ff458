#!/usr/bin/env python
"""How long a checkpoint save stops training: asynchronous against synchronous; prints one JSON
document.

    python benchmarks/checkpoint.py                                  # ARFlow-B/2, local and S3
    python benchmarks/checkpoint.py --model ARFlow-S/2 --repeats 1   # a quick rehearsal
    python benchmarks/checkpoint.py --no-s3                          # local disk only

One process, the DDP backend (torch DCP files), AdamW state after one step, and the EMA: the
state a trainer saves. For each target — a local directory, and a loopback S3 endpoint (moto's
server, started here) — the same state is saved `--repeats` times each way by one checkpoint
manager, as a run saves (medians):
  - `plain_s`: DCP, the rank file and the EMA written directly: no checksums, no fsync, no
    commit marker (local only; what a save costs without the checkpoint component's guarantees);
  - `sync_s`: the checkpoint component with `checkpoint.async_save: false`: training waits for
    the whole save (write, checksums, fsync, upload, commit);
  - `async_stall_s`: the same component with background saves: how long `save` holds the
    training loop (the copy into host memory), from the second save on, when the host buffers
    are reused (`async_first_stall_s`: the first, which allocates them); `async_total_s`: until
    the save is committed.
`stall_ratio` = async_stall_s / sync_s: the share of a synchronous save's stop that remains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist


def moto_endpoint(stack: contextlib.ExitStack) -> str:
    """A moto S3 server on a free loopback port with one bucket, stopped with `stack`."""
    import boto3

    from arflow.distributed.env import free_port

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(proc.wait)
    stack.callback(proc.terminate)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
    return url


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ARFlow-B/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4, help="saves per mode and target (>= 2)")
    parser.add_argument("--dir", default=None, help="local target (default: a temp dir)")
    parser.add_argument("--no-s3", action="store_true", help="skip the loopback S3 target")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model trains (cuda: the state is staged into pinned host memory)",
    )
    args = parser.parse_args()

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from arflow.checkpoint import CheckpointManager
    from arflow.config import config_from_dict
    from arflow.distributed.env import init_distributed
    from arflow.distributed.parallelize import build_backend
    from arflow.models import ARFlow, architecture_of
    from arflow.storage.hashing import list_files
    from arflow.utils.rng import rng_state

    info = init_distributed(args.device)
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
    for p in backend.trainable.values():  # AdamW state as after a step (on the device)
        p.grad = torch.randn_like(p) * 1e-3
    backend.optimizer.step()
    ema = {k: v.detach().clone() for k, v in backend.module.state_dict().items()}
    arch = architecture_of(model)
    rank_state = {"rng": rng_state(), "data": {"index": 1}}

    def plain(target: Path) -> None:
        (target / "trainer").mkdir(parents=True)
        torch.save(rank_state, target / "trainer" / "rank_00000.pt")
        save_file({k: v.cpu() for k, v in ema.items()}, str(target / "ema.safetensors"))
        dcp.save(backend._state(), checkpoint_id=str(target))

    def component(url: str, options: dict | None, background: bool) -> list[tuple[float, float]]:
        """(stall, total) seconds of `--repeats` saves by one manager, as a run makes them
        (a background save's host buffers are reused from its second save on); each save is
        waited for before the next, so that stalls are measured alone."""
        manager = CheckpointManager(
            url, info, keep_last=1, storage_options=options, background=background
        )
        manager.open()
        manager.resume_target(None, overwrite=True)
        out = []
        for step in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            manager.save(
                step,
                stage_state=backend.stage_state,
                rank_state=rank_state,
                ema=ema,
                arch=arch,
                config=cfg.to_dict(),
            )
            stall = time.perf_counter() - t0
            manager.wait()
            out.append((stall, time.perf_counter() - t0))
        manager.close()
        return out

    base = Path(args.dir or tempfile.mkdtemp(prefix="arflow-ckpt-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with contextlib.ExitStack() as stack:
        # The checkpoint component reports on stdout; stdout is this benchmark's JSON alone.
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        targets = {"local": (str(base / "component"), None)}
        if not args.no_s3:
            endpoint = moto_endpoint(stack)
            targets["s3"] = ("s3://bench/ckpt", {"client_kwargs": {"endpoint_url": endpoint}})
        for name, (url, options) in targets.items():
            runs: dict[str, list[float]] = {}
            if name == "local":
                runs["plain_s"] = []
                for i in range(args.repeats):
                    target = base / f"plain_{i}"
                    t0 = time.perf_counter()
                    plain(target)
                    runs["plain_s"].append(time.perf_counter() - t0)
                    shutil.rmtree(target)
            runs["sync_s"] = [total for _, total in component(url, options, False)]
            saves = component(url, options, True)
            runs["async_first_stall_s"] = [saves[0][0]]  # host buffers allocated
            warm = saves[1:] or saves
            runs["async_stall_s"] = [stall for stall, _ in warm]
            runs["async_total_s"] = [total for _, total in warm]
            median = {k: round(statistics.median(v), 4) for k, v in runs.items()}
            median["stall_ratio"] = round(median["async_stall_s"] / median["sync_s"], 3)
            results[name] = median
    plain(base / "size")
    size = sum(os.path.getsize(base / "size" / rel) for rel in list_files(str(base / "size")))
    print(
        json.dumps(
            {
                "model": args.model,
                "params": sum(p.numel() for p in model.parameters()),
                "checkpoint_bytes": size,
                "repeats": args.repeats,
                "device": str(info.device)
                if info.device.type == "cpu"
                else torch.cuda.get_device_name(info.device),
                "cpu_threads": torch.get_num_threads(),
                **results,
            },
            indent=2,
        )
    )
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
