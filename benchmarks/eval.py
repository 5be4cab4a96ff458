"""Cost of the FID / IS evaluation, printed as JSON.

Per run (each N in a fresh process, so peak memory is that run's own):
- samples_per_s_per_rank: generated, decoded and featurised samples per second of one rank;
- feature_share: the fraction of that time spent in Inception feature extraction;
- peak_rss_mb: the process's peak resident memory, which must not grow with N (nothing is kept
  per sample: statistics are fixed-size sums).

Presets: "digits" is the CPU demo model (configs/digits_cpu.json's architecture, 8x8 pixels,
10 classes); "xl256" is ARFlow-XL/2 on 32x32x4 latents with an SD-VAE-shaped decoder, SDE 250
steps and CFG 1.5, the paper's 256 px setting (meant for a GPU). Weights are random: the cost is
the real one, the scores are meaningless. Inception weights are random too (the test suite's
generator, tests/random_inception.py) unless --inception-weights names the real file (same cost).

On CUDA, sampling runs at the sampler's `precision` ("auto": bf16 autocast with TF32, the
default; "fp32" for the comparison) and peak_gpu_mb is the allocator's peak of the run.

    python benchmarks/eval.py [--preset digits] [--num-samples 1000 10000] [--device cpu]
                              [--steps 250] [--batch-size 64] [--precision auto]

--steps shortens the sampler (e.g. to measure the memory curve of large N in less time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from arflow.config import EvalConfig, SamplerConfig
from arflow.eval import evaluate
from arflow.models import ARFlow, create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from random_inception import write_random_weights  # noqa: E402

PRESETS = {
    "digits": dict(sampler=SamplerConfig(method="sde", steps=250), batch_size=64),
    "xl256": dict(sampler=SamplerConfig(method="sde", steps=250, cfg_scale=1.5), batch_size=32),
}


def build_model(preset: str, device: str) -> ARFlow:
    torch.manual_seed(0)
    if preset == "digits":
        model = ARFlow(
            input_size=8,
            patch_size=2,
            in_channels=3,
            hidden_size=96,
            depth=4,
            num_heads=4,
            num_classes=10,
        )
    else:
        model = create_model("ARFlow-XL/2", input_size=32, in_channels=4, num_classes=1000)
    return model.to(device).eval()  # fp32 weights, as the trainer's gathered EMA model


def write_sd_shaped_vae(folder: Path) -> str:
    """A random AutoencoderKL with SD-VAE's architecture (8x upsampling, 4 latent channels)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        sample_size=256,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae.save_pretrained(folder)
    return str(folder)


def child(args) -> dict:
    """One evaluation of N samples in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.inception_weights or str(write_random_weights(Path(tmp) / "inception.pth"))
        vae = write_sd_shaped_vae(Path(tmp) / "vae") if args.preset == "xl256" else None
        preset = PRESETS[args.preset]
        sampler = preset["sampler"]
        sampler = dataclasses.replace(
            sampler, steps=args.steps or sampler.steps, precision=args.precision
        )
        cfg = EvalConfig(
            num_samples=args.num_samples[0],
            batch_size=args.batch_size or preset["batch_size"],
            sampler=sampler,
            inception_weights=weights,
            vae=vae,
            is_splits=min(10, args.num_samples[0]),
        )
        model = build_model(args.preset, args.device)
        result = evaluate(model, cfg, device=args.device, progress=False)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return {
        "preset": args.preset,
        "device": device_name,
        "threads": torch.get_num_threads(),
        "num_samples": result["num_samples"],
        "batch_size": cfg.batch_size,
        "sampler": f"{cfg.sampler.method} {cfg.sampler.steps} steps, cfg {cfg.sampler.cfg_scale}",
        "precision": cfg.sampler.precision,
        "seconds": round(result["seconds"], 2),
        "samples_per_s_per_rank": round(result["num_samples"] / result["seconds"], 3),
        "feature_share": round(result["feature_seconds"] / result["seconds"], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if args.device == "cuda"
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--num-samples", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch-size", type=int, help="per rank (default: the preset's)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the preset's, 250)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "tf32", "fp32"),
        default="auto",
        help="sampler precision (auto: bf16 autocast + TF32 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--inception-weights", help="real weights file (default: random, same cost)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = []
    for n in args.num_samples:
        argv = [
            sys.executable,
            __file__,
            "--child",
            "--preset",
            args.preset,
            "--num-samples",
            str(n),
            "--device",
            args.device,
            "--precision",
            args.precision,
        ]
        for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps)):
            if value:
                argv += [flag, str(value)]
        if args.inception_weights:
            argv += ["--inception-weights", args.inception_weights]
        child_run = subprocess.run(argv, capture_output=True, text=True)
        if child_run.returncode:  # its traceback, not just "returned non-zero exit status"
            sys.exit(f"{' '.join(argv)} failed:\n{child_run.stderr[-4000:]}")
        runs.append(json.loads(child_run.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # a long run's partial results
    rss = [r["peak_rss_mb"] for r in runs]
    print(json.dumps({"runs": runs, "peak_rss_growth": round(max(rss) / min(rss), 3)}, indent=1))


if __name__ == "__main__":
    main()
