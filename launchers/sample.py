#!/usr/bin/env python
"""Sample images from an exported ARFlow model and write them as one PNG grid.

    python launchers/sample.py --ckpt arflow_xl2.safetensors --classes 207,360,387 \
        --cfg 1.5 --steps 250 --sampler sde --seed 0 --out grid.png --vae sd-vae-ft-ema/

--ckpt is a `.safetensors` written by tools/convert_ckpt.py (it carries the architecture).
Latent models need --vae, a local diffusers AutoencoderKL folder; pixel models need none.
Image i uses seed --seed + i, so a grid is reproducible and each image can be regenerated
alone with the same label and seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from arflow.eval.generate import load_vae, to_uint8  # noqa: E402
from arflow.flow.samplers import METHODS, SamplerConfig, sample  # noqa: E402
from arflow.models import load_pretrained  # noqa: E402
from arflow.utils.images import save_grid  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="exported .safetensors (tools/convert_ckpt.py)")
    p.add_argument("--classes", required=True, help="comma-separated class ids, one image each")
    p.add_argument(
        "--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)"
    )
    p.add_argument(
        "--cfg-channels",
        default="3",
        help="guide only the first K channels as the reference does, or 'all' (default 3)",
    )
    p.add_argument("--steps", type=int, default=250, help="sampling steps (default 250)")
    p.add_argument(
        "--sampler", choices=METHODS, default="sde", help="default: sde (SiT's Euler-Maruyama)"
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent models)")
    p.add_argument(
        "--latent-scale", type=float, default=0.18215, help="latents were scaled by this (SD-VAE)"
    )
    p.add_argument("--cols", type=int, help="images per grid row (default: near-square)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(
            f"--classes must be comma-separated integers, got {args.classes!r}"
        ) from None
    model = load_pretrained(args.ckpt, device=args.device)
    bad = [c for c in classes if not 0 <= c < model.num_classes]
    if bad:
        raise SystemExit(f"--classes {bad} out of range: the model has {model.num_classes} classes")
    if args.vae is None and model.in_channels not in (1, 3):
        raise SystemExit(
            f"the model works on {model.in_channels}-channel latents: pass --vae with the local "
            f"AutoencoderKL folder they came from"
        )
    channels = None if args.cfg_channels == "all" else int(args.cfg_channels)
    config = SamplerConfig(
        method=args.sampler, steps=args.steps, cfg_scale=args.cfg, cfg_channels=channels
    )
    labels = torch.tensor(classes, device=args.device)
    seeds = [args.seed + i for i in range(len(classes))]
    x = sample(model, labels, seeds, config, progress=True)
    if args.vae is not None:
        vae = load_vae(args.vae, args.device)
        with torch.no_grad():
            x = vae.decode(x.to(vae.dtype) / args.latent_scale).sample.float()
    path = save_grid(to_uint8(x), args.out, cols=args.cols)
    print(f"wrote {path} ({len(classes)} images, {tuple(x.shape[-2:])} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
