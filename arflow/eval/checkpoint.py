"""The weights to evaluate. One small function so the trainer's checkpoint format can replace
the plain state dict read here."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..models import ARFlow


def load_model(ckpt: str | Path, model_cfg: ModelConfig, device: torch.device) -> ARFlow:
    """ARFlow with the architecture of `model_cfg` and the weights of `ckpt`, in eval mode.

    ckpt: a plain model state dict (pass the EMA weights) as `.safetensors`, or `.pt` / `.pth`
    written by torch.save; loaded with strict=True, so a mismatch names the offending keys.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    elif path.suffix in (".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"checkpoint {path}: expected a .safetensors, .pt or .pth state dict")
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
