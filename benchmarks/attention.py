"""Cost of hybrid attention, printed as JSON.

1. block_ratio: forward+backward time of an ARFlow block divided by the same block with
   per-image softmax attention only (SiT-style: fused qkv + proj, no linear path, no gates),
   at the same shapes. Goals: <= 1.15 on CPU at reduced width, <= 1.10 on a GPU at ARFlow-XL/2
   shapes in bf16 (S = 5 images of N = 256 tokens).
2. sampling_ratio: model-call time at sampling step 250 over step 1 (goal <= 1.05: the state
   has a fixed size, so a late step costs what an early one does).
3. On a GPU: tokens/s of the ARFlow-XL/2 forward+backward with flash-attn (when installed)
   and with PyTorch SDPA.

    python benchmarks/attention.py [--device cpu|cuda] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from arflow.models import (
    ARFlowBlock,
    create_model,
    hybrid_attention,
)


class IntraOnlyAttention(nn.Module):
    """SiT-style attention applied per image: fused qkv with bias, SDPA, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h, c, state=None, form="parallel"):
        B, S, N, D = h.shape
        qkv = self.qkv(h).view(B * S, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, N, D)
        return self.proj(out), state


def timed(fn, device: str, repeats: int, warmup: int = 3) -> list[float]:
    """Seconds per call of fn, after `warmup` untimed calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def block_ratio(dim, heads, batch, images, tokens, device, dtype, repeats, compile=False) -> dict:
    torch.manual_seed(0)
    hybrid = ARFlowBlock(dim, heads).to(device)
    baseline = ARFlowBlock(dim, heads)
    baseline.attn = IntraOnlyAttention(dim, heads)
    baseline = baseline.to(device)
    if compile:  # both blocks through torch.compile, as a training run with compile would
        hybrid, baseline = torch.compile(hybrid), torch.compile(baseline)
    x = torch.randn(batch, images, tokens, dim, device=device, requires_grad=True)
    c = torch.randn(batch, images, dim, device=device)

    def run(block):
        def fwd_bwd():
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                out, _ = block(x, c)
            out.float().square().mean().backward()

        return fwd_bwd

    # Interleave the two so that drift in machine load hits both alike.
    t_hybrid, t_base = [], []
    for _ in range(repeats):
        t_hybrid += timed(run(hybrid), device, 1, warmup=1)
        t_base += timed(run(baseline), device, 1, warmup=1)
    med_h, med_b = statistics.median(t_hybrid), statistics.median(t_base)
    return {
        "shape": {"batch": batch, "images": images, "tokens": tokens, "dim": dim, "heads": heads},
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": compile,
        "hybrid_ms": round(med_h * 1e3, 3),
        "intra_only_ms": round(med_b * 1e3, 3),
        "block_ratio": round(med_h / med_b, 3),
    }


def sampling_ratio(name, input_size, batch, device, dtype, steps=250, window=5) -> dict:
    torch.manual_seed(0)
    model = create_model(name, input_size=input_size, in_channels=4).to(device).eval()
    x = torch.randn(batch, 4, input_size, input_size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    state, times = None, []
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        for i in range(steps):
            t = torch.full((batch,), i / steps, device=device)
            holder = {}

            def call(t=t, state=state, holder=holder):
                holder["v"], holder["state"] = model.step(x, t, y, state)

            # Step 1 gets warm-up calls whose states are not committed.
            times += timed(call, device, 1, warmup=3 if i == 0 else 0)
            state = holder["state"]
    first = statistics.median(times[:window])
    last = statistics.median(times[-window:])
    return {
        "model": name,
        "input_size": input_size,
        "batch": batch,
        "step_1_ms": round(first * 1e3, 3),
        f"step_{steps}_ms": round(last * 1e3, 3),
        "sampling_ratio": round(last / first, 3),
        "note": f"medians over the first and last {window} steps",
    }


def tokens_per_second(device, repeats, batch=8) -> dict:
    """ARFlow-XL/2 on 256 px latents (S = 5, N = 256), bf16, forward+backward."""
    model = create_model("ARFlow-XL/2").to(device)
    x = torch.randn(batch, 5, 4, 32, 32, device=device)
    t = torch.rand(batch, 5, device=device).sort(dim=1).values
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def fwd_bwd():
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().square().mean().backward()

    result = {}
    kernels = {"sdpa": None}
    if hybrid_attention.flash_attn_func is not None:
        kernels["flash_attn"] = hybrid_attention.flash_attn_func
    saved = hybrid_attention.flash_attn_func
    try:
        for label, kernel in kernels.items():
            hybrid_attention.flash_attn_func = kernel
            sec = statistics.median(timed(fwd_bwd, device, repeats))
            result[f"tokens_per_s_{label}"] = round(batch * 5 * 256 / sec)
    finally:
        hybrid_attention.flash_attn_func = saved
    if "flash_attn" not in kernels:
        result["flash_attn"] = "not installed"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes: every code path in seconds (the GPU suite's rehearsal on a CPU)",
    )
    parser.add_argument(
        "--sampling-batch",
        type=int,
        help="batch of the sampling ratio's model calls (CFG doubles the samples' batch)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure the block ratio with both blocks under torch.compile",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads first (CPU)")
    args = parser.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.tiny:
        shapes = (64, 2, 2, 5, 16, device, torch.float32, args.repeats)
        sampling = ("ARFlow-S/8", 16, 2, device, torch.float32)
    elif device == "cuda":  # ARFlow-XL/2 shapes in bf16 (18 heads of 64)
        shapes = (1152, 18, 8, 5, 256, device, torch.bfloat16, args.repeats)
        sampling = ("ARFlow-XL/2", 32, 8, device, torch.bfloat16)
    else:  # reduced width, fp32
        shapes = (384, 6, 4, 5, 256, device, torch.float32, args.repeats)
        sampling = ("ARFlow-S/2", 32, 2, device, torch.float32)
    if args.sampling_batch:
        sampling = (*sampling[:2], args.sampling_batch, *sampling[3:])
    report["block"] = block_ratio(*shapes)
    if args.compile:
        report["block_compiled"] = block_ratio(*shapes, compile=True)
    report["sampling"] = sampling_ratio(*sampling)
    if device == "cuda":
        report["throughput"] = tokens_per_second(device, args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
