"""FID / Inception Score of ARFlow weights, the work split over every rank of the job.

Reads:  --ckpt (a weight file, run directory, checkpoint step directory or root); the config's
        eval section (--config, --set, --protocol): eval.reference statistics, eval.vae for
        latent models, eval.inception_weights (default: torch-fidelity's cache, downloaded
        there when online).
Writes: one JSON line on stdout (fid, inception_score, num_samples, seconds, ...), also to
        --out; with --save-npz the samples as an ADM .npz (arr_0 uint8 NHWC, arr_1 labels).

  arflow evaluate --ckpt runs/xl_256 --config xl_256
  torchrun --nproc_per_node 8 -m arflow evaluate --ckpt arflow_xl2.safetensors \\
      --config xl_256 --protocol paper-cfg --save-npz samples.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from .common import UsageError, config_arguments
from .fid import inception_arguments, process_group

# The public release's evaluation (its sample_ddp.py + the ADM suite): 50,000 samples with
# uniformly random labels, SiT's SDE with 250 steps and a final mean step of 0.04, guidance on
# the first 3 latent channels, fp32 with TF32 matmuls, latents decoded by the VAE (eval.vae, its
# own scale), images written as an ADM .npz. "paper-cfg" is the guided figure (CFG 1.5).
PROTOCOLS = {
    "paper": [
        "eval.num_samples=50000",
        "eval.labels=random",
        "eval.sampler.method=sde",
        "eval.sampler.steps=250",
        "eval.sampler.last_step_size=0.04",
        "eval.sampler.cfg_scale=1.0",
        "eval.sampler.cfg_channels=3",
        "eval.sampler.precision=tf32",
    ],
}
PROTOCOLS["paper-cfg"] = [*PROTOCOLS["paper"], "eval.sampler.cfg_scale=1.5"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt",
        required=True,
        help="weights (arflow.models.load_pretrained): a .safetensors written by the trainer or "
        "`arflow convert`, a Hub folder, a run or checkpoint step directory, or a checkpoint "
        "root (the checkpoint `--resume auto` would take there)",
    )
    config_arguments(parser, required=False)
    parser.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        help="preset eval settings: 'paper' reproduces the release's FID-50K protocol, "
        "'paper-cfg' its guided figure (CFG 1.5); needs --save-npz; --set still overrides",
    )
    parser.add_argument("--save-npz", help="also write the samples as an ADM .npz (arr_0 NHWC)")
    parser.add_argument("--out", help="also write the result JSON to this file (rank 0)")
    inception_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from arflow.config import apply_overrides, config_from_dict, load_config

    if args.protocol and not args.save_npz:
        raise UsageError(f"--protocol {args.protocol} writes the ADM .npz: pass --save-npz PATH")
    overrides = [*PROTOCOLS.get(args.protocol, []), *args.set]
    if args.config:
        cfg = load_config(args.config, overrides)
    else:
        cfg = config_from_dict(apply_overrides({}, overrides))
    eval_cfg = cfg.eval
    if args.inception_weights:
        eval_cfg = dataclasses.replace(eval_cfg, inception_weights=args.inception_weights)
    device = args.device if args.device != "auto" else cfg.parallel.device

    from arflow.checkpoint.locate import weights_file
    from arflow.eval.evaluate import evaluate
    from arflow.models import load_pretrained

    with process_group(device, cfg.parallel.collective_timeout_s) as info:
        model = load_pretrained(weights_file(args.ckpt), info.device).requires_grad_(False)
        result = evaluate(
            model,
            eval_cfg,
            device=info.device,
            progress=not args.no_progress,
            save_npz=args.save_npz,
        )
        if info.is_main:
            text = json.dumps(result)
            print(text)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
    return 0
