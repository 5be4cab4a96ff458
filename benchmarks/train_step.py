#!/usr/bin/env python
"""Training-step throughput; prints one JSON document.

    python benchmarks/train_step.py            # every case this machine can run
    python benchmarks/train_step.py --cases digits-1proc

Cases: the digits config on CPU with 1 and 2 processes (its own backend, synthetic data of its
shape, so the figure is the step, not the data pipeline); on a GPU, ARFlow-B/2 and XL/2 on
256 px latents (32x32x4, n = 5) in bf16 under DeepSpeed ZeRO-2 and FSDP2: images/s, step time,
achieved TFLOP/s (counted by torch's FlopCounterMode on one micro-batch), MFU against the GPU's
dense bf16 peak, and peak memory. Each case runs in its own process group (torchrun), with
warm-up steps excluded and CUDA synchronised around the timed steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first.
BF16_PEAK = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]

CASES = {
    "digits-1proc": dict(config="configs/digits_cpu.json", nproc=1, gpu=False, set=[]),
    "digits-2proc": dict(config="configs/digits_cpu.json", nproc=2, gpu=False, set=[]),
}
for model, tag in (("ARFlow-B/2", "b2"), ("ARFlow-XL/2", "xl2")):
    for backend, extra in (("deepspeed", ["parallel.zero_stage=2"]), ("fsdp2", [])):
        CASES[f"{tag}-256-{backend}{'-zero2' if backend == 'deepspeed' else ''}"] = dict(
            config="configs/xl_256.json",
            nproc=1,
            gpu=True,
            set=[
                f"model.name={model}",
                f"parallel.backend={backend}",
                "parallel.precision=bf16",
                "parallel.device=cuda",
                "train.micro_batch_size=32",
                "train.global_batch_size=32",
                *extra,
            ],
        )


def worker(args) -> None:
    """Runs inside the process group: time `--steps` steps after `--warmup` steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from arflow.config import load_config
    from arflow.distributed.backend import build_backend
    from arflow.distributed.env import init_distributed, shutdown
    from arflow.flow.transport import training_loss
    from arflow.models import ARFlow
    from arflow.utils.metrics import peak_memory_gb
    from arflow.utils.synthetic import SyntheticLoader

    cfg = load_config(args.config, args.set + ["data.url=synthetic", "logging.wandb=false"])
    info = init_distributed(cfg.parallel.device)
    cfg.validate(info.world_size)
    m = cfg.model
    torch.manual_seed(0)
    model = ARFlow(**m.architecture())
    flops = None
    if info.is_main:  # FLOPs of one micro-batch, forward + backward, on the plain model
        probe = ARFlow(**m.architecture()).to(info.device)
        x = torch.randn(
            cfg.train.micro_batch_size,
            cfg.data.seq_len,
            m.in_channels,
            m.input_size,
            m.input_size,
            device=info.device,
        )
        y = torch.zeros(cfg.train.micro_batch_size, dtype=torch.long, device=info.device)
        counter = FlopCounterMode(display=False)
        with (
            counter,
            torch.autocast(
                info.device.type, dtype=torch.bfloat16, enabled=info.device.type == "cuda"
            ),
        ):
            training_loss(probe, x, y).backward()
        flops = counter.get_total_flops()
        del probe
    backend = build_backend(model, cfg, info)
    loader = iter(
        SyntheticLoader(
            sample_shape=(m.in_channels, m.input_size, m.input_size),
            num_classes=m.num_classes,
            seq_len=cfg.data.seq_len,
            batch_size=cfg.train.micro_batch_size,
            rank=info.rank,
        )
    )
    accum = cfg.grad_accumulation(info.world_size)

    def step():
        batches = [tuple(t.to(info.device) for t in next(loader)) for _ in range(accum)]
        backend.train_step(batches, training_loss, cfg.optim.lr)

    for _ in range(args.warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    step_time = times[len(times) // 2]  # median
    if info.is_main:
        images = cfg.train.global_batch_size * cfg.data.seq_len
        result = {
            "model": m.name
            if m.depth is None
            else f"{m.name} (depth {m.depth}, width {m.hidden_size})",
            "backend": cfg.parallel.backend
            + (f" ZeRO-{cfg.parallel.zero_stage}" if cfg.parallel.backend == "deepspeed" else ""),
            "processes": info.world_size,
            "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
            "global_batch_sequences": cfg.train.global_batch_size,
            "images_per_s": images / step_time,
            "step_time_s": step_time,
            "peak_memory_gb": peak_memory_gb(info.device),
        }
        if info.device.type == "cuda":
            achieved = flops * accum * info.world_size / step_time
            peak = next((p for k, p in BF16_PEAK if k in result["device"]), None)
            result["tflops_per_s"] = achieved / 1e12
            result["mfu"] = achieved / (peak * info.world_size) if peak else None
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


def launch(name: str, case: dict, steps: int, warmup: int) -> dict:
    from arflow.distributed.env import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(case["nproc"]),
        "--master_port",
        str(free_port()),
        __file__,
        "--worker",
        "--config",
        case["config"],
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    for item in case["set"]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=None, help=f"subset of {list(CASES)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    names = args.cases or [n for n, c in CASES.items() if not c["gpu"] or torch.cuda.is_available()]
    results = {}
    for name in names:
        case = CASES[name]
        if case["gpu"] and not torch.cuda.is_available():
            results[name] = {"skipped": "needs a CUDA GPU"}
            continue
        results[name] = launch(name, case, args.steps, args.warmup)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
