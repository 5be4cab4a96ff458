"""Convert ARFlow weights into one self-describing .safetensors (or a plain .pt).

Reads:  RUN_CKPT, a checkpoint directory written by the trainer (DeepSpeed ZeRO stage 1/2/3,
        FSDP2 / DCP or DDP; a run's checkpoint root takes its latest): the EMA weights by
        default, its files checked against the checkpoint's checksums first;
        or --from-official FILE.pt, a checkpoint of the public ARFlow release (a plain state
        dict or a dict with "ema" and/or "model"; the architecture is inferred from the tensor
        shapes, override with the --arch-* flags).
Writes: --out, one file that `arflow sample --ckpt`, `arflow evaluate --ckpt` and
        arflow.models.load_pretrained read (they also read checkpoint directories; converting
        gives one portable file, or the raw weights with --no-ema); with --hub, --out is a
        Hugging Face Hub folder instead (config.json, model.safetensors and a model card: the
        architecture, the training config and step, the sampler, the run's last FID when its
        metrics.jsonl is found), which ARFlow.from_pretrained and `push_to_hub` take. A damaged
        file is reported as damaged; a pickle that needs code to unpickle is refused, never run.

  arflow convert runs/xl_256/checkpoints/step_000400000 --out xl256.safetensors
  arflow convert --from-official ARFlow-XL-2.pt --out arflow_xl2.safetensors
  arflow convert --from-official ARFlow-XL-2.pt --to-pt --out arflow_xl2.pt
  arflow convert runs/xl_256/checkpoints --hub --out arflow-xl2-256/   # a Hub folder
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import UsageError

OVERRIDABLE = ("input_size", "num_classes", "class_dropout_prob", "num_heads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ckpt",
        nargs="?",
        help="trainer checkpoint directory (step_XXXXXXXXX) or run checkpoint root (takes the latest)",
    )
    parser.add_argument(
        "--from-official", metavar="FILE", help="import a public-release .pt checkpoint"
    )
    parser.add_argument(
        "--out", required=True, help="output file (.safetensors, or .pt with --to-pt)"
    )
    parser.add_argument(
        "--no-ema", action="store_true", help="export the raw weights instead of the EMA"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--to-pt", action="store_true", help="write a plain torch state dict instead of safetensors"
    )
    output.add_argument(
        "--hub",
        action="store_true",
        help="write a Hub folder at --out (config.json, model.safetensors, model card); needs "
        "the `hub` extra",
    )
    for key in OVERRIDABLE:
        kind = float if key == "class_dropout_prob" else int
        parser.add_argument(
            f"--arch-{key.replace('_', '-')}",
            dest=key,
            type=kind,
            help=f"override the inferred {key} (official import)",
        )


def _official(args: argparse.Namespace) -> tuple[dict, dict, dict | None]:
    from arflow.models.pretrained import infer_architecture, read_official_checkpoint, zoo_name

    state = read_official_checkpoint(args.from_official, use_ema=not args.no_ema)
    dropout = 0.1 if args.class_dropout_prob is None else args.class_dropout_prob
    arch = infer_architecture(state, class_dropout_prob=dropout)
    for key in OVERRIDABLE:
        if getattr(args, key) is not None:
            arch[key] = getattr(args, key)
    name = zoo_name(arch) or "custom"
    print(f"inferred architecture ({name}): {json.dumps(arch)}", file=sys.stderr)
    return state, arch, None


def convert(args: argparse.Namespace) -> Path:
    """Write args.out from the source; raises on a missing, damaged or unsafe source."""
    import torch

    from arflow.models.pretrained import save_hub_folder, save_pretrained

    step = None
    if args.from_official:
        state, arch, config = _official(args)
    else:
        from arflow.checkpoint.export import read_trainer_checkpoint

        state, arch, config, step = read_trainer_checkpoint(args.ckpt, use_ema=not args.no_ema)
    out = Path(args.out)
    if args.to_pt:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.contiguous() for k, v in state.items()}, out)
    elif args.hub:
        metrics = Path(config["run"]["dir"]) / "metrics.jsonl" if config else None
        metrics = metrics if metrics is not None and metrics.is_file() else None
        save_hub_folder(state, out, arch, config, step=step, metrics=metrics)
    else:
        save_pretrained(state, out, arch, config)
    print(f"wrote {out} ({sum(v.numel() for v in state.values()):,} values)", file=sys.stderr)
    return out


def run(args: argparse.Namespace) -> int:
    if bool(args.ckpt) == bool(args.from_official):
        raise UsageError(
            "give exactly one source: a trainer checkpoint directory or --from-official FILE"
        )
    from arflow.utils.safe_load import CorruptFileError, UnsafeCheckpointError

    expected = [
        CorruptFileError,
        UnsafeCheckpointError,
        FileNotFoundError,
        FileExistsError,
        ImportError,  # --hub without huggingface_hub: the message says what to install
        ValueError,
        KeyError,
    ]
    if args.ckpt:  # only trainer checkpoints need the checkpoint code (and fsspec, `data` extra)
        from arflow.checkpoint import CheckpointError

        expected.append(CheckpointError)
    try:
        convert(args)
    except tuple(expected) as err:
        print(f"arflow convert: error: {err}", file=sys.stderr)
        return 1
    return 0
