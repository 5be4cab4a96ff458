"""Sample images from ARFlow weights and write them as one PNG grid.

Reads:  --ckpt: a weight file written by the trainer (ema.safetensors) or `arflow convert` (it
        carries the architecture), a Hub folder, a run directory, a checkpoint step directory,
        or a checkpoint root (the checkpoint `--resume auto` would take there);
        --vae: the local diffusers AutoencoderKL folder of a latent model (its config gives
        the latent scale); pixel models need none.
Writes: --out, one PNG grid, one image per class id. Image i uses seed --seed + i, so a grid is
        reproducible and each image can be regenerated alone with the same label and seed.

  arflow sample --ckpt arflow_xl2.safetensors --classes 207,360,387 --cfg 1.5 --steps 250 \\
      --sampler sde --seed 0 --out grid.png --vae sd-vae-ft-ema/
"""

from __future__ import annotations

import argparse
import typing

from arflow.config import ConfigError, SamplerConfig

from .common import UsageError, positive_int

METHODS = typing.get_args(typing.get_type_hints(SamplerConfig)["method"])
PRECISIONS = typing.get_args(typing.get_type_hints(SamplerConfig)["precision"])


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt",
        required=True,
        help="weights: a .safetensors with metadata, a Hub folder, a run or step directory, or "
        "a checkpoint root",
    )
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
        choices=PRECISIONS,
        default=defaults.precision,
        help="auto: bf16 autocast with TF32 on CUDA, fp32 on CPU",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent models)")
    p.add_argument("--cols", type=positive_int, help="images per grid row (default: near-square)")
    p.add_argument("--device", help="default: cuda when available, else cpu")


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    try:
        channels = None if args.cfg_channels == "all" else int(args.cfg_channels)
        return SamplerConfig(
            method=args.sampler,
            steps=args.steps,
            cfg_scale=args.cfg,
            cfg_channels=channels,
            precision=args.precision,
        )
    except (ValueError, ConfigError) as err:
        raise UsageError(f"sampler settings: {err}") from None


def run(args: argparse.Namespace) -> int:
    config = sampler_config(args)  # before any file is read
    import torch

    from arflow.checkpoint.locate import weights_file
    from arflow.flow.samplers import sample
    from arflow.models import load_pretrained
    from arflow.models.vae import load_vae
    from arflow.utils.images import save_grid, to_uint8

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(weights_file(args.ckpt), device=device)
    bad = [c for c in args.classes if not 0 <= c < model.num_classes]
    if bad:
        raise SystemExit(f"--classes {bad} out of range: the model has {model.num_classes} classes")
    if args.vae is None and model.in_channels not in (1, 3):
        raise SystemExit(
            f"the model works on {model.in_channels}-channel latents: pass --vae with the local "
            f"AutoencoderKL folder they came from"
        )
    vae = load_vae(args.vae, device) if args.vae else None
    labels = torch.tensor(args.classes, device=device)
    seeds = [args.seed + i for i in range(len(args.classes))]
    x = sample(model, labels, seeds, config, progress=True)
    if vae is not None:
        x = vae.decode(x)
    path = save_grid(to_uint8(x), args.out, cols=args.cols)
    print(f"wrote {path} ({len(args.classes)} images, {tuple(x.shape[-2:])} px)")
    return 0
