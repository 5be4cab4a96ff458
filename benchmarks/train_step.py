#!/usr/bin/env python
"""Training-step throughput; prints one JSON document.

    python benchmarks/train_step.py                      # every case this machine can run
    python benchmarks/train_step.py --cases xl2-zero2-compile --micro-batch 16

Cases:
- digits-1proc, digits-2proc: the digits config on CPU with 1 and 2 processes (its own backend);
- {b2,xl2}-{zero2,fsdp2}-{compile,eager} (CUDA): ARFlow-B/2 and XL/2 on 256 px latents
  (32x32x4, n = 5 images per sequence) in bf16 under DeepSpeed ZeRO-2 or FSDP2, with the
  blocks compiled (parallel.compile) or eager; one process;
- tiny-{zero2,fsdp2}-{compile,eager}: the same path with a two-block model on 8x8 inputs, for
  rehearsing the GPU cases on a CPU (benchmarks/gpu_suite.sh --dry-run).
Data is synthetic of the model's shape, so the figure is the step, not the data pipeline.

Each case runs in its own process group (torchrun): `--warmup` untimed steps (the first one
compiles; its time is reported as first_step_s), then `--steps` steps each timed with CUDA
events (wall clock on CPU); the median gives images/s.

FLOPs: the model FLOPs of one training image, counted from the architecture
(`arflow.utils.flops.train_flops_per_image`, whose docstring gives the formula). The same count
is also taken by torch's FlopCounterMode on one sequence (`counted_flops_per_image`) as a check
of the formula (on a CPU it misses SDPA's CPU kernel, ~5% of B/2's FLOPs). MFU = achieved model
FLOP/s over the GPU's dense peak at the run's precision, looked up from the device name at run
time (`arflow.utils.flops.peak_flops`; H100 SXM / H200: 989 TFLOP/s in bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# model tag -> (config, --set items, default micro-batch in sequences, needs CUDA). Micro-batches
# fit one 80 GB GPU: eager bf16 saves ~4.2 GB of activations per XL/2 sequence (5 x 256 tokens;
# measured with saved-tensor hooks), ~1.1 GB per B/2 sequence; weights, gradients and AdamW
# states add ~12 GB at XL/2.
MODELS = {
    "b2": ("configs/b_256.json", ["model.name=ARFlow-B/2"], 32, True),
    "xl2": ("configs/xl_256.json", ["model.name=ARFlow-XL/2"], 12, True),
    "tiny": (
        "configs/xl_256.json",
        [
            "model.name=ARFlow-S/2",
            "model.depth=2",
            "model.hidden_size=64",
            "model.num_heads=2",
            "model.input_size=8",
            "model.num_classes=10",
            "samples.classes=[0]",
        ],
        2,
        False,
    ),
}
BACKENDS = {
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "fsdp2": ["parallel.backend=fsdp2"],
}
CASES = {
    "digits-1proc": dict(config="configs/digits_cpu.json", nproc=1, gpu=False, set=[]),
    "digits-2proc": dict(config="configs/digits_cpu.json", nproc=2, gpu=False, set=[]),
}
for _tag, (_config, _model, _micro, _gpu) in MODELS.items():
    for _backend, _extra in BACKENDS.items():
        for _mode in ("compile", "eager"):
            CASES[f"{_tag}-{_backend}-{_mode}"] = dict(
                config=_config,
                nproc=1,
                gpu=_gpu,
                micro_batch=_micro,
                compile=_mode == "compile",
                set=[
                    *_model,
                    *_extra,
                    "parallel.precision=" + ("bf16" if _gpu else "auto"),
                    "parallel.device=" + ("cuda" if _gpu else "auto"),
                ],
            )


def counted_flops_per_image(model, cfg, device) -> float:
    """torch's FlopCounterMode on one sequence, forward + backward, at the run's precision."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from arflow.flow.transport import training_loss

    m, n = cfg.model, cfg.data.seq_len
    x = torch.randn(1, n, m.in_channels, m.input_size, m.input_size, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    bf16 = cfg.parallel.precision == "bf16"
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        training_loss(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


def worker(args) -> None:
    """Runs inside the process group: `--warmup` untimed steps, then `--steps` timed ones."""
    import torch

    from arflow.config import load_config
    from arflow.distributed.env import init_distributed, shutdown
    from arflow.distributed.parallelize import build_backend, compile_enabled
    from arflow.flow.transport import training_loss
    from arflow.models import ARFlow
    from arflow.utils.flops import peak_flops, train_flops_per_image
    from arflow.utils.metrics import peak_memory_gb
    from arflow.utils.synthetic import SyntheticLoader

    cfg = load_config(args.config, args.set + ["data.url=synthetic", "logging.wandb=false"])
    info = init_distributed(cfg.parallel.device)
    cfg.validate(info.world_size)
    cuda = info.device.type == "cuda"
    m = cfg.model
    arch = m.architecture()
    torch.manual_seed(0)
    model = ARFlow(**arch)
    counted = counted_flops_per_image(model.to(info.device), cfg, info.device)
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

    def timed_step() -> float:
        batches = [tuple(t.to(info.device) for t in next(loader)) for _ in range(accum)]
        if not cuda:
            t0 = time.perf_counter()
            backend.train_step(batches, training_loss, cfg.optim.lr)
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        backend.train_step(batches, training_loss, cfg.optim.lr)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    t0 = time.perf_counter()
    timed_step()  # compiles when parallel.compile is on
    first_wall = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        timed_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [timed_step() for _ in range(args.steps)]
    step_time = statistics.median(times)
    if info.is_main:
        images = cfg.train.global_batch_size * cfg.data.seq_len
        flops = train_flops_per_image(arch, cfg.data.seq_len)
        result = {
            "model": m.name
            if m.depth is None
            else f"{m.name} (depth {m.depth}, width {m.hidden_size})",
            "backend": cfg.parallel.backend
            + (f" ZeRO-{cfg.parallel.zero_stage}" if cfg.parallel.backend == "deepspeed" else ""),
            "compile": compile_enabled(cfg, info.device),
            "precision": backend.precision,
            "processes": info.world_size,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "micro_batch_sequences": cfg.train.micro_batch_size,
            "global_batch_sequences": cfg.train.global_batch_size,
            "images_per_step": images,
            "steps_timed": len(times),
            "step_time_s": step_time,
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "first_step_s": first_wall,
            "images_per_s": images / step_time,
            "flops_per_image": flops,
            "counted_flops_per_image": counted,
            "tflops_per_s": flops * images / step_time / 1e12,
        }
        if cuda:
            peak = peak_flops(result["device"], backend.precision)
            result["peak_tflops_per_gpu"] = peak / 1e12 if peak else None
            result["mfu"] = flops * images / step_time / (peak * info.world_size) if peak else None
            result["peak_memory_gb"] = peak_memory_gb(info.device)
            result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        else:
            result["peak_rss_gb"] = peak_memory_gb(info.device)
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


def launch(case: dict, args) -> dict:
    from arflow.distributed.env import free_port

    items = list(case["set"])
    if "compile" in case:
        items.append(f"parallel.compile={'true' if case['compile'] else 'false'}")
    micro = args.micro_batch or case.get("micro_batch")
    if micro:
        items += [f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}"]
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
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    for item in items:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    # The worker's own traceback (torchrun prefixes it with [rankN]:), not the launcher's.
    ranks = [line for line in proc.stderr.splitlines() if line.startswith("[rank")]
    return {"error": "\n".join(ranks)[-2000:] or (proc.stderr or proc.stdout)[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=None, help=f"subset of {list(CASES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument(
        "--micro-batch", type=int, help="sequences per step (default: the case's own)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles)")
    if args.worker:
        return worker(args)
    unknown = sorted(set(args.cases or []) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    import torch

    default = [n for n, c in CASES.items() if n.startswith("digits") or c["gpu"]]
    names = args.cases or [n for n in default if not CASES[n]["gpu"] or torch.cuda.is_available()]
    results = {}
    for name in names:
        case = CASES[name]
        if case["gpu"] and not torch.cuda.is_available():
            results[name] = {"skipped": "needs a CUDA GPU"}
            continue
        results[name] = launch(case, args)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
