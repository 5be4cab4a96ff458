"""The Hugging Face Hub format of ARFlow weights, and the one check of any weight file's
metadata against its tensors.

A Hub folder (or repository) holds `config.json` (the model's constructor arguments, which
huggingface_hub's `PyTorchModelHubMixin` records from `ARFlow(...)`'s keyword arguments),
`model.safetensors` (the state dict) and `README.md` (a model card generated here). `HubMixin`
is ARFlow's base class: `model.save_pretrained(dir)`, `ARFlow.from_pretrained(dir or repo id)`
and `model.push_to_hub(repo id)` come from it. pretrained.py holds the other format (one
self-describing .safetensors file) and `save_hub_folder`, which writes a folder from a state
dict; this module sits below the model class because the class derives from `HubMixin`.

Both formats say which architecture their tensors belong to, and a file may lie (damaged,
edited, or written for another model). `check_weights` compares what the metadata implies
against the names and shapes in the file's header, building the expected model on the meta
device and reading no tensor data, so a file claiming a huge model is refused before anything
of that size exists. Both loaders call it before they allocate the model.

huggingface_hub is optional (the `hub` extra, >= 0.24 for the mixin's model_card_kwargs;
diffusers brings it too): without it the model works and its Hub methods raise an ImportError
that says what to install.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch

from arflow.config import MODEL_NAMES, SamplerConfig, model_kwargs

try:
    from huggingface_hub import ModelCard, PyTorchModelHubMixin, constants, hf_hub_download
except ImportError:  # pragma: no cover - depends on the install
    PyTorchModelHubMixin = None

PAPER_URL = "https://arxiv.org/abs/2501.16085"
HUB_EXTRA = "pip install 'arflow[hub]' (huggingface_hub)"
WEIGHTS_NAME = "model.safetensors"  # huggingface_hub's name for the folder's weights
LISTED = 8  # mismatching keys named one by one in an error; the rest are counted


def zoo_name(arch: dict) -> str | None:
    """The zoo name ("ARFlow-XL/2") whose shape matches `arch`, if any."""
    for name in MODEL_NAMES:
        zoo = model_kwargs(name)
        if all(arch.get(k) == v for k, v in zoo.items()) and arch.get("mlp_ratio") == 4.0:
            return name
    return None


# ------------------------------------------------------------------------------ the check
def meta_model(model_class: type, arch: dict, source: str) -> torch.nn.Module:
    """`model_class(**arch)` on the meta device: every parameter's shape, no memory, no
    initialisation. ValueError naming `source` when the arguments build no model."""
    try:
        with torch.device("meta"):
            return model_class(**arch)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(
            f"{source}: its architecture {json.dumps(arch)} builds no model: {err}"
        ) from None


def _summary(items: list[str], separator: str = ", ") -> str:
    shown = separator.join(items[:LISTED])
    return shown + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


def shape_mismatches(expected: dict[str, tuple], actual: dict[str, tuple]) -> list[str]:
    """What differs between the names and shapes a model expects and those a file (or state
    dict) holds, one sentence per kind (shapes, missing keys, unexpected keys); empty when they
    agree."""
    problems = []
    shapes = [
        f"{k}: the architecture implies {expected[k]}, the weights hold {actual[k]}"
        for k in expected
        if k in actual and tuple(expected[k]) != tuple(actual[k])
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape(s) differ: " + _summary(shapes, "; "))
    missing = [k for k in expected if k not in actual]
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + _summary(missing))
    unexpected = [k for k in actual if k not in expected]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + _summary(unexpected))
    return problems


def open_safetensors(path: str | Path):
    """safe_open(path) (memory-mapped: reading the header or a slice's shape loads no tensor
    data); ValueError naming the file when it is not a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt?): {err}") from None


def file_shapes(path: str | Path) -> dict[str, tuple]:
    """Tensor name -> shape, read from a safetensors file's header (no tensor data)."""
    with open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _blocks(shapes: dict[str, tuple]) -> int:
    """1 + the highest block index among the names (0 without blocks)."""
    indices = [int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))]
    return 1 + max(indices, default=-1)


def check_weights(
    model_class: type, path: str | Path, arch: dict, source: str | None = None
) -> torch.nn.Module:
    """The one check of a weight file's metadata: raises ValueError naming `source` (default:
    the file), the architecture, every differing key with the shape the architecture implies
    and the shape in the file, and the missing and unexpected keys. Returns the expected model
    on the meta device (for the caller to materialise).

    Only the header is read. A depth beyond the file's blocks is checked on the blocks the file
    has plus one: the remaining blocks are named as missing without being built, so a claim of
    any depth costs no more than the file itself.
    """
    source = source or str(path)
    shapes = file_shapes(path)
    depth, present = arch.get("depth"), _blocks(shapes)
    built = dict(arch)
    if isinstance(depth, int) and depth > present + 1:
        built["depth"] = present + 1
    model = meta_model(model_class, built, source)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = shape_mismatches(expected, shapes)
    if built is not arch and built["depth"] != depth:
        problems.append(f"Blocks {present + 1} to {depth - 1} are missing too")
    if problems:
        raise ValueError(
            f"{source} does not hold the model its metadata describes "
            f"({json.dumps(arch)}). " + ". ".join(problems) + "."
        )
    return model


def load_checked(
    model_class: type,
    path: str | Path,
    arch: dict,
    device: str | torch.device = "cpu",
    source: str | None = None,
) -> torch.nn.Module:
    """`model_class(**arch)` with the weights of the safetensors file `path`, loaded strictly,
    in eval mode, after `check_weights`. The parameters are allocated on `device` only once
    the check has passed, and are never initialised (the file fills every one)."""
    from safetensors.torch import load_file

    model = check_weights(model_class, path, arch, source)
    model.to_empty(device=device)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


# -------------------------------------------------------------------------- the model card
def last_evaluation(metrics: str | Path) -> dict | None:
    """The last row with an FID in a run's `metrics.jsonl` (`metrics`: the file or the run
    directory), as {"step": ..., "eval/fid": ..., other eval/* values}; None when the run
    logged no FID (or has no metrics file). Lines cut short by a crash are skipped."""
    path = Path(metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("eval/fid"), (int, float)):
            last = row
    if last is None:
        return None
    return {k: v for k, v in last.items() if k == "step" or k.startswith("eval/")}


def _table(rows: list[tuple[str, object]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows if value is not None]
    return "\n".join(lines)


def _get(config: dict | None, *keys):
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def publishable(config):
    """`config` with every `storage_options` value withheld: fsspec options may hold storage
    credentials, and a model card is written to be published."""
    if isinstance(config, dict):
        return {
            k: ("<withheld>" if k == "storage_options" and v else publishable(v))
            for k, v in config.items()
        }
    if isinstance(config, list):
        return [publishable(v) for v in config]
    return config


def card_text(
    arch: dict,
    parameters: tuple[int, int],
    training_config: dict | None = None,
    step: int | None = None,
    evaluation: dict | None = None,
) -> str:
    """The Markdown body of a model card: architecture (zoo name, parameter count), training
    (steps, main settings, the whole config but storage options), sampler defaults and the
    last FID.

    parameters: (trainable, total); training_config: the run's config as a dict
    (`Config.to_dict()`); step: the training step of these weights; evaluation: a
    `last_evaluation` row."""
    name = zoo_name(arch)
    trainable, total = parameters
    classes = arch.get("num_classes")
    null = " (+ 1 null class for guidance)" if arch.get("class_dropout_prob", 0) > 0 else ""
    size, channels = arch.get("input_size"), arch.get("in_channels")
    parts = [
        f"# {name or 'ARFlow (custom size)'}",
        "",
        "A class-conditional image generator of "
        f"[ARFlow: Autoregressive Flow with Hybrid Linear Attention]({PAPER_URL}), "
        "saved by the `arflow` training framework.",
        "",
        "## Architecture",
        "",
        _table(
            [
                ("Model", name or "not a zoo size"),
                ("Parameters", f"{trainable:,} trainable ({total:,} with the fixed positions)"),
                (
                    "Depth / hidden size / heads",
                    f"{arch.get('depth')} / {arch.get('hidden_size')} / {arch.get('num_heads')}",
                ),
                ("Input", f"{size}x{size}x{channels}, patch {arch.get('patch_size')}"),
                ("Classes", f"{classes}{null}"),
                ("Attention", arch.get("attention")),
                ("Learned sigma (extra output half, dropped)", arch.get("learn_sigma")),
            ]
        ),
        "",
        "## Training",
        "",
    ]
    planned = _get(training_config, "train", "steps")
    if step is not None:
        parts.append(f"Trained for {step:,} steps" + (f" of {planned:,}." if planned else "."))
    elif planned is not None:
        parts.append(f"Configured for {planned:,} steps (the step of these weights was not given).")
    else:
        parts.append("No training record came with these weights.")
    if training_config is not None:
        parts += [
            "",
            _table(
                [
                    ("Data", _get(training_config, "data", "url")),
                    ("Images per sequence", _get(training_config, "data", "seq_len")),
                    (
                        "Global batch (sequences)",
                        _get(training_config, "train", "global_batch_size"),
                    ),
                    ("Learning rate", _get(training_config, "optim", "lr")),
                    ("EMA decay", _get(training_config, "ema", "decay")),
                    ("Backend", _get(training_config, "parallel", "backend")),
                    ("Precision", _get(training_config, "parallel", "precision")),
                ]
            ),
            "",
            "<details><summary>The run's whole config</summary>",
            "",
            "```json",
            json.dumps(publishable(training_config), indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
        ]
    sampler = _get(training_config, "eval", "sampler") or dataclasses.asdict(SamplerConfig())
    parts += [
        "",
        "## Sampling",
        "",
        "Sampler settings (`arflow.config.SamplerConfig`"
        + (", the run's `eval.sampler`):" if _get(training_config, "eval", "sampler") else "):"),
        "",
        _table([(key, json.dumps(value)) for key, value in sampler.items()]),
        "",
        "## Evaluation",
        "",
    ]
    fid = (evaluation or {}).get("eval/fid")
    if isinstance(fid, (int, float)) and math.isfinite(fid):
        samples = evaluation.get("eval/num_samples")
        parts.append(
            f"FID {fid:.2f} at step {evaluation.get('step')}"
            + (f" ({samples:,} samples)" if isinstance(samples, int) else "")
            + ", the run's last evaluation."
        )
    else:
        parts.append("No FID was recorded for these weights.")
    parts += [
        "",
        "## Use",
        "",
        "```python",
        "from arflow.models import ARFlow",
        "",
        'model = ARFlow.from_pretrained("<this folder or repository>")',
        "```",
    ]
    return "\n".join(parts)


CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"

if PyTorchModelHubMixin is not None:

    class HubMixin(
        PyTorchModelHubMixin,
        library_name="arflow",
        tags=["arflow", "image-generation", "flow-matching", "class-conditional"],
        model_card_template=CARD_TEMPLATE,  # the body (card_text) links the paper
    ):
        """ARFlow's Hub methods (huggingface_hub's PyTorchModelHubMixin): `save_pretrained`,
        `from_pretrained` (a folder or a repository id; strict, checked before allocation),
        `push_to_hub`. `save_pretrained(dir, model_card_kwargs={"training_config": ...,
        "step": ..., "evaluation": ...})` fills the card's training section."""

        @classmethod
        def _from_pretrained(
            cls,
            *,
            model_id: str,
            revision: str | None,
            cache_dir: str | Path | None,
            force_download: bool,
            local_files_only: bool,
            token: str | bool | None,
            config: dict | None = None,
            map_location: str | torch.device = "cpu",
            **arch,
        ):
            # `arch`: config.json's constructor arguments, with the caller's overrides.
            if config is None:
                raise FileNotFoundError(
                    f"{model_id} has no {constants.CONFIG_NAME}: not a folder written by "
                    f"ARFlow.save_pretrained"
                )
            if os.path.isdir(model_id):
                path = os.path.join(model_id, WEIGHTS_NAME)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{model_id} has no {WEIGHTS_NAME}")
            else:
                path = hf_hub_download(
                    repo_id=model_id,
                    filename=WEIGHTS_NAME,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )
            source = f"{model_id} ({WEIGHTS_NAME} against {constants.CONFIG_NAME})"
            return load_checked(cls, path, arch, map_location, source)

        def generate_model_card(
            self,
            *args,
            training_config: dict | None = None,
            step: int | None = None,
            evaluation: dict | None = None,
            **kwargs,
        ) -> ModelCard:
            params = list(self.parameters())
            counts = (
                sum(p.numel() for p in params if p.requires_grad),
                sum(map(torch.numel, params)),
            )
            body = card_text(self._hub_mixin_config, counts, training_config, step, evaluation)
            return super().generate_model_card(*args, body=body, **kwargs)

else:  # pragma: no cover - depends on the install

    class HubMixin:
        """Stand-in without huggingface_hub: the Hub methods say what to install."""

        def save_pretrained(self, *args, **kwargs):
            raise ImportError(f"ARFlow.save_pretrained writes a Hub folder: {HUB_EXTRA}")

        def push_to_hub(self, *args, **kwargs):
            raise ImportError(f"ARFlow.push_to_hub needs huggingface_hub: {HUB_EXTRA}")

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ImportError(f"ARFlow.from_pretrained reads a Hub folder: {HUB_EXTRA}")
