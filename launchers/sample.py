#!/usr/bin/env python
"""Sample images from an ARFlow weight file and write them as one PNG grid.

    python launchers/sample.py --ckpt arflow_xl2.safetensors --classes 207,360,387 \
        --cfg 1.5 --steps 250 --sampler sde --seed 0 --out grid.png --vae sd-vae-ft-ema/

--ckpt is a weight file written by the trainer (ema.safetensors) or tools/convert_ckpt.py: it
carries the architecture. Latent models need --vae, a local diffusers AutoencoderKL folder (its
config gives the latent scale); pixel models need none. Image i uses seed --seed + i, so a grid
is reproducible and each image can be regenerated alone with the same label and seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from arflow.config import ConfigError, SamplerConfig  # noqa: E402
from arflow.flow.samplers import METHODS, sample  # noqa: E402
from arflow.models import load_pretrained  # noqa: E402
from arflow.models.vae import load_vae  # noqa: E402
from arflow.utils.images import save_grid, to_uint8  # noqa: E402


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def class_list(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not classes:
        raise argparse.ArgumentTypeError("give at least one class id, e.g. --classes 207,360")
    return classes


def parse_args(argv=None) -> tuple[argparse.Namespace, SamplerConfig]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="weight file (.safetensors with metadata)")
    p.add_argument(
        "--classes",
        required=True,
        type=class_list,
        help="comma-separated class ids, one image each",
    )
    defaults = SamplerConfig()
    p.add_argument(
        "--cfg", type=float, default=defaults.cfg_scale, help="guidance scale (1 = none)"
    )
    p.add_argument(
        "--cfg-channels",
        default=str(defaults.cfg_channels),
        help="guide only the first K channels as the reference does, or 'all' (default 3)",
    )
    p.add_argument("--steps", type=positive_int, default=defaults.steps, help="sampling steps")
    p.add_argument("--sampler", choices=METHODS, default=defaults.method, help="sampling method")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "tf32", "fp32"),
        default=defaults.precision,
        help="auto: bf16 autocast with TF32 on CUDA, fp32 on CPU",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent models)")
    p.add_argument("--cols", type=positive_int, help="images per grid row (default: near-square)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        channels = None if args.cfg_channels == "all" else int(args.cfg_channels)
        config = SamplerConfig(
            method=args.sampler,
            steps=args.steps,
            cfg_scale=args.cfg,
            cfg_channels=channels,
            precision=args.precision,
        )
    except (ValueError, ConfigError) as err:
        p.error(f"sampler settings: {err}")
    return args, config


def main(argv=None) -> int:
    args, config = parse_args(argv)
    model = load_pretrained(args.ckpt, device=args.device)
    bad = [c for c in args.classes if not 0 <= c < model.num_classes]
    if bad:
        raise SystemExit(f"--classes {bad} out of range: the model has {model.num_classes} classes")
    if args.vae is None and model.in_channels not in (1, 3):
        raise SystemExit(
            f"the model works on {model.in_channels}-channel latents: pass --vae with the local "
            f"AutoencoderKL folder they came from"
        )
    vae = load_vae(args.vae, args.device) if args.vae else None
    labels = torch.tensor(args.classes, device=args.device)
    seeds = [args.seed + i for i in range(len(args.classes))]
    x = sample(model, labels, seeds, config, progress=True)
    if vae is not None:
        x = vae.decode(x)
    path = save_grid(to_uint8(x), args.out, cols=args.cols)
    print(f"wrote {path} ({len(args.classes)} images, {tuple(x.shape[-2:])} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
