"""ARFlow weights on disk, in two formats that hold the same tensors:

- one self-describing `.safetensors` file: the state dict plus metadata (the constructor
  arguments and, optionally, the training config), so `load_pretrained(path)` rebuilds the
  model from the file alone. The trainer's exports (`model.safetensors`, `ema.safetensors`),
  the EMA in every checkpoint and tools/convert_ckpt.py write it with `save_pretrained`;
  `load_pretrained` is its loader (it also takes a run directory, a checkpoint step directory
  or a Hub folder).
- a Hugging Face Hub folder or repository: `config.json` (the same constructor arguments),
  `model.safetensors` and a model card. `ARFlow.save_pretrained(dir)`,
  `ARFlow.from_pretrained(dir or repo id)` and `push_to_hub` come from hub.py's `HubMixin`;
  `save_hub_folder` writes a folder from a state dict (conversion of a checkpoint or a file).

Either loader checks the metadata against the file's tensor names and shapes before it builds
the model (`hub.check_weights`, the one check), so a file that describes another model is
refused with the differing keys and shapes, and a file that claims a huge model allocates
nothing.

`infer_architecture` reads the architecture off a state dict's tensor shapes, for files that
carry no metadata (the public release's checkpoints).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..storage.hashing import HashingWriter, verify_listed
from ..utils.safe_load import CorruptFileError, UnsafeCheckpointError, load_torch_file
from .arflow import ARFlow
from .hub import (
    last_evaluation,
    load_checked,
    meta_model,
    open_safetensors,
    shape_mismatches,
    zoo_name,
)

ARCH_KEY = "arflow.architecture"
NAME_KEY = "arflow.model"
CONFIG_KEY = "arflow.config"
EMA_FILE = "ema.safetensors"  # the EMA weights in a run directory and in each checkpoint
HUB_CONFIG = "config.json"  # what makes a directory a Hub folder


def architecture_of(model: ARFlow) -> dict:
    """Constructor arguments that rebuild `model`'s architecture."""
    block = model.blocks[0]
    return dict(
        input_size=model.input_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        hidden_size=model.pos_embed.shape[-1],
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / block.mlp.fc1.in_features,
        class_dropout_prob=model.y_embedder.dropout_prob,
        num_classes=model.num_classes,
        learn_sigma=model.learn_sigma,
        attention=model.attention,
    )


def infer_architecture(state: dict[str, torch.Tensor], class_dropout_prob: float = 0.1) -> dict:
    """Constructor arguments read off the tensor shapes of an ARFlow state dict.

    The embedding table has num_classes + 1 rows when the model was trained with label dropout
    (the null class); `class_dropout_prob` says which case applies (the release used 0.1).
    """
    required = (
        "x_embedder.proj.weight",
        "pos_embed",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "blocks.0.mlp.fc1.weight",
    )
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not an ARFlow state dict: missing {', '.join(missing)}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} positions, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_per_token = state["final_layer.linear.weight"].shape[0]
    out_channels = out_per_token // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.linear gives {out_channels} output channels for {in_channels} input "
            f"channels: expected {in_channels} or {2 * in_channels}"
        )
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    # The hybrid attention has one decay gate per head (gt_proj); the block-causal softmax
    # ablation has none, and then the heads are not visible in any shape: 64 channels per
    # head, as in the zoo's /2 models (override with --arch-num-heads).
    gate = state.get("blocks.0.attn.gt_proj.weight")
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=gate.shape[0] if gate is not None else max(1, hidden // 64),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        class_dropout_prob=class_dropout_prob,
        num_classes=rows - 1 if class_dropout_prob > 0 else rows,
        learn_sigma=out_channels == 2 * in_channels,
        attention="hybrid" if gate is not None else "causal_softmax",
    )


def model_holding(state: dict[str, torch.Tensor], arch: dict) -> ARFlow:
    """ARFlow(**arch) holding `state`'s tensors themselves (no copy, no initialisation), after
    the same name and shape comparison as `hub.check_weights`: ValueError naming each
    difference, so no unloadable file is ever written."""
    model = meta_model(ARFlow, arch, "the weights to save")
    problems = shape_mismatches(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in state.items()},
    )
    if problems:
        raise ValueError(
            f"the weights do not fit the architecture {json.dumps(arch)}. "
            + ". ".join(problems)
            + "."
        )
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def weights_bytes(state: dict[str, torch.Tensor], arch: dict, config: dict | None = None) -> bytes:
    """`state` and its architecture (and the training config, if given) serialised as one
    self-describing safetensors file. The state is checked against the architecture first
    (`model_holding`)."""
    from safetensors.torch import save

    tensors = model_holding(state, arch).state_dict()
    metadata = {ARCH_KEY: json.dumps(arch)}
    name = zoo_name(arch)
    if name:
        metadata[NAME_KEY] = name
    if config is not None:
        metadata[CONFIG_KEY] = json.dumps(config)
    return save(tensors, metadata=metadata)


def save_pretrained(
    state: dict[str, torch.Tensor], path: str | Path, arch: dict, config: dict | None = None
) -> Path:
    """Write `state` as a self-describing weight file (see `weights_bytes`), atomically."""
    payload = weights_bytes(state, arch, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with HashingWriter(str(tmp)) as f:  # write errors (disk full) name the file
        f.write(payload)
    tmp.replace(path)  # never leave a half-written file under the final name
    return path


def read_metadata(path: str | Path) -> dict:
    """The metadata of a weight file written by `save_pretrained` (architecture, config)."""
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    if ARCH_KEY not in meta:
        raise ValueError(
            f"{path} has no '{ARCH_KEY}' metadata: it was not written by arflow "
            f"(convert it with tools/convert_ckpt.py)"
        )
    return {
        "architecture": json.loads(meta[ARCH_KEY]),
        "model": meta.get(NAME_KEY),
        "config": json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None,
    }


def resolve_weights(path: str | Path) -> Path:
    """The weights `path` stands for: a file as it is; a Hub folder (config.json and
    model.safetensors) as it is; a run directory or a checkpoint step directory: its EMA weights
    (`ema.safetensors`). Which step of a checkpoint root is meant is the checkpoint component's
    rule (`arflow.checkpoint.weights_file`), not a listing's order."""
    path = Path(path)
    if path.is_file() or (path / HUB_CONFIG).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"weights {path} do not exist")
    if (path / EMA_FILE).is_file():
        return path / EMA_FILE
    raise FileNotFoundError(
        f"{path} holds no weights: expected a .safetensors file, a Hub folder (config.json), a "
        f"run or checkpoint step directory with {EMA_FILE}, or a checkpoint root (the `arflow` "
        f"commands take one: arflow.checkpoint.weights_file)"
    )


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> ARFlow:
    """The model in a self-describing weight file (or a directory, see `resolve_weights`),
    weights loaded strictly, in eval mode. A file listed in its checkpoint's meta.json is
    checked against its recorded size and checksum first, and its metadata against its tensors
    before the model is allocated (`hub.check_weights`)."""
    path = resolve_weights(path)
    if path.is_dir():  # a Hub folder
        return ARFlow.from_pretrained(path, map_location=str(device)).to(device).eval()
    verify_listed(str(path))
    meta = read_metadata(path)
    return load_checked(ARFlow, path, meta["architecture"], device)


def save_hub_folder(
    state: dict[str, torch.Tensor],
    directory: str | Path,
    arch: dict,
    config: dict | None = None,
    *,
    step: int | None = None,
    metrics: str | Path | None = None,
) -> Path:
    """Write `state` as a Hub folder (config.json, model.safetensors, README.md: what
    `ARFlow.save_pretrained` writes and `ARFlow.from_pretrained` reads), for conversion.

    config: the run's training config (`Config.to_dict()`), shown by the model card; step: the
    training step of these weights; metrics: the run's metrics.jsonl (or its run directory),
    whose last FID the card quotes (`hub.last_evaluation`). The folder is written beside its
    final name and renamed into place; an existing non-empty `directory` is refused, not
    overwritten (huggingface_hub would keep its old card). Needs huggingface_hub."""
    import shutil

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty directory")
    model = model_holding(state, arch)
    card = dict(
        training_config=config,
        step=step,
        evaluation=last_evaluation(metrics) if metrics is not None else None,
    )
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, model_card_kwargs=card)
    tmp.replace(directory)
    return directory


def read_official_checkpoint(path: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a public-release checkpoint: a plain state dict, or a dict holding
    "ema" and/or "model" (training checkpoints also hold an argparse.Namespace under "args").

    Loaded with weights_only=True; argparse.Namespace is the one class allowed beyond tensors
    and containers, so a file that needs any other code to unpickle is refused, never run.
    """
    import argparse

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = load_torch_file(str(path), allowed=[argparse.Namespace])
    except (UnsafeCheckpointError, CorruptFileError) as err:
        raise ValueError(str(err)) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict of weights")
    if all(torch.is_tensor(v) for v in obj.values()):
        state = obj
    else:
        order = ("ema", "model") if use_ema else ("model",)
        key = next((k for k in order if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise ValueError(
                f"{path} is neither a state dict nor a dict with {' or '.join(map(repr, order))} "
                f"(keys: {sorted(obj)})"
            )
        state = obj[key]
    # Weights saved from a DDP- or torch.compile-wrapped model carry a prefix.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state
