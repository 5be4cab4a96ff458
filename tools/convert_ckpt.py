#!/usr/bin/env python
"""Convert ARFlow weights into one self-describing `.safetensors` (or a plain `.pt`).

Sources:
  RUN_CKPT                    a checkpoint directory written by the trainer (DeepSpeed ZeRO
                              stage 1/2/3, FSDP2 / DCP or DDP): EMA weights by default; its
                              files are checked against the checkpoint's checksums first
  --from-official FILE.pt     a checkpoint of the public ARFlow release: a plain state dict or
                              a dict with "ema" and/or "model"; the architecture is inferred
                              from the tensor shapes (override with the --arch-* flags)

Examples:
  python tools/convert_ckpt.py runs/xl256/checkpoints/step_000400000 --out xl256.safetensors
  python tools/convert_ckpt.py --from-official ARFlow-XL-2.pt --out arflow_xl2.safetensors
  python tools/convert_ckpt.py --from-official ARFlow-XL-2.pt --to-pt --out arflow_xl2.pt

Load the result with `arflow.models.load_pretrained(path)` or sample with
`launchers/sample.py --ckpt path`. (Both also read a checkpoint directory directly; converting
gives one portable file, or the raw weights with --no-ema.) A damaged file is reported as
damaged; a pickle that needs code to unpickle is refused, never run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from arflow.models.pretrained import (  # noqa: E402
    infer_architecture,
    read_official_checkpoint,
    save_pretrained,
    zoo_name,
)

OVERRIDABLE = ("input_size", "num_classes", "class_dropout_prob", "num_heads")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    parser.add_argument(
        "--to-pt", action="store_true", help="write a plain torch state dict instead of safetensors"
    )
    for key in OVERRIDABLE:
        kind = float if key == "class_dropout_prob" else int
        parser.add_argument(
            f"--arch-{key.replace('_', '-')}",
            dest=key,
            type=kind,
            help=f"override the inferred {key} (official import)",
        )
    args = parser.parse_args(argv)
    if bool(args.ckpt) == bool(args.from_official):
        parser.error(
            "give exactly one source: a trainer checkpoint directory or --from-official FILE"
        )
    return args


def official(args) -> tuple[dict, dict, dict | None]:
    state = read_official_checkpoint(args.from_official, use_ema=not args.no_ema)
    dropout = 0.1 if args.class_dropout_prob is None else args.class_dropout_prob
    arch = infer_architecture(state, class_dropout_prob=dropout)
    for key in OVERRIDABLE:
        if getattr(args, key) is not None:
            arch[key] = getattr(args, key)
    name = zoo_name(arch) or "custom"
    print(f"inferred architecture ({name}): {json.dumps(arch)}", file=sys.stderr)
    return state, arch, None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_official:
        state, arch, config = official(args)
    else:
        from arflow.checkpoint.export import read_trainer_checkpoint

        state, arch, config = read_trainer_checkpoint(args.ckpt, use_ema=not args.no_ema)
    out = Path(args.out)
    if args.to_pt:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.contiguous() for k, v in state.items()}, out)
    else:
        save_pretrained(state, out, arch, config)
    print(f"wrote {out} ({sum(v.numel() for v in state.values()):,} values)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from arflow.checkpoint import CheckpointError
    from arflow.utils.safe_load import CorruptFileError, UnsafeCheckpointError

    try:
        raise SystemExit(main())
    except (
        CheckpointError,
        CorruptFileError,
        UnsafeCheckpointError,
        FileNotFoundError,
        ValueError,
        KeyError,
    ) as err:
        print(f"convert_ckpt: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
