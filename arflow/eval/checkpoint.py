"""The weights to evaluate, from any of the project's weight formats."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..models import ARFlow
from ..models.pretrained import ARCH_KEY


def load_model(ckpt: str | Path, model_cfg: ModelConfig, device: torch.device) -> ARFlow:
    """ARFlow with the weights of `ckpt`, in eval mode, without gradients. `ckpt` is one of:

    - a trainer checkpoint directory (a step directory, or the checkpoint root for its newest
      complete step): its EMA weights and its own architecture;
    - a `.safetensors` written by tools/convert_ckpt.py: the architecture from its metadata;
    - a plain state dict (`.safetensors`, or `.pt` / `.pth` from torch.save, read with
      weights_only=True) for the architecture of `model_cfg`.
    Loading is strict, so a mismatch names the offending keys.
    """
    path = Path(ckpt)
    if path.is_dir():
        from ..distributed.export import read_trainer_checkpoint

        state, arch, _ = read_trainer_checkpoint(str(path), use_ema=True)
        model = ARFlow(**arch)
        model.load_state_dict(state, strict=True)
        return model.to(device).eval().requires_grad_(False)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            self_describing = ARCH_KEY in (f.metadata() or {})
        if self_describing:
            from ..models import load_pretrained

            return load_pretrained(path, device).requires_grad_(False)
        state = load_file(path)
    elif path.suffix in (".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"checkpoint {path}: expected a trainer checkpoint directory, a .safetensors, "
            f"or a .pt / .pth state dict"
        )
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a plain model state dict (name -> tensor)")
    model = ARFlow(**model_cfg.architecture())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not fit model {model_cfg.name} as configured "
            f"(model.* keys of the config): {err}"
        ) from err
    return model.to(device).eval().requires_grad_(False)
