"""Self-describing weight files, public-release import and the sampling CLI."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import sequence, tiny_model

from arflow.models import (
    ARFlow,
    architecture_of,
    infer_architecture,
    load_pretrained,
    save_pretrained,
)
from arflow.utils.images import GAP_PX

ROOT = Path(__file__).resolve().parents[1]


def load_tool(relpath: str):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_ckpt = load_tool("tools/convert_ckpt.py")


def test_save_and_load_pretrained_roundtrip(tmp_path):
    model = tiny_model(seed=3)
    path = save_pretrained(
        model.state_dict(),
        tmp_path / "m.safetensors",
        architecture_of(model),
        config={"run": {"name": "x"}},
    )
    loaded = load_pretrained(path)
    x, t, y = sequence()
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert not list(tmp_path.glob("*.tmp"))


def test_save_pretrained_refuses_a_state_that_does_not_fit(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    del state["blocks.1.attn.gt_proj.weight"]
    with pytest.raises(RuntimeError, match="gt_proj"):
        save_pretrained(state, tmp_path / "m.safetensors", architecture_of(model))
    assert not list(tmp_path.iterdir())


def test_load_pretrained_names_a_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not written by arflow"):
        load_pretrained(tmp_path / "other.safetensors")


@pytest.mark.parametrize("name", ["ARFlow-XL/2", "ARFlow-B/4", "ARFlow-S/8"])
def test_architecture_inferred_from_shapes(name):
    from arflow.models import create_model

    with torch.device("meta"):
        model = create_model(name, input_size=16 if name.endswith("/8") else 32, num_classes=1000)
    assert infer_architecture(model.state_dict()) == architecture_of(model)


def release_checkpoint(tmp_path, layout: str) -> tuple[Path, ARFlow]:
    """A checkpoint in the release's layouts, from this project's model with another seed.
    Returns the file and the model whose weights should come out (the EMA where present)."""
    ema, raw = tiny_model(seed=7, num_classes=10), tiny_model(seed=8, num_classes=10)
    if layout == "plain":
        obj, expected = ema.state_dict(), ema
    elif layout == "training":  # what the release's train loop saves
        obj = {
            "model": raw.state_dict(),
            "ema": ema.state_dict(),
            "opt": {"state": {}},
            "args": argparse.Namespace(model="ARFlow-S/2", image_size=256),
        }
        expected = ema
    else:  # only the raw model, saved from a DDP wrapper
        obj, expected = {"model": {f"module.{k}": v for k, v in raw.state_dict().items()}}, raw
    path = tmp_path / f"{layout}.pt"
    torch.save(obj, path)
    return path, expected


@pytest.mark.parametrize("layout", ["plain", "training", "ddp_model_only"])
def test_official_import_gives_equal_outputs(tmp_path, layout, capsys):
    path, expected = release_checkpoint(tmp_path, layout)
    out = tmp_path / "imported.safetensors"
    convert_ckpt.main(["--from-official", str(path), "--out", str(out)])
    assert "inferred architecture (custom)" in capsys.readouterr().err
    model = load_pretrained(out)
    x, t, y = sequence()
    assert torch.equal(model(x, t, y), expected(x, t, y))


def test_official_import_no_ema_and_to_pt(tmp_path):
    path, _ = release_checkpoint(tmp_path, "training")
    raw = tiny_model(seed=8, num_classes=10)
    out = tmp_path / "raw.pt"
    convert_ckpt.main(["--from-official", str(path), "--no-ema", "--to-pt", "--out", str(out)])
    state = torch.load(out, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in raw.state_dict().items())


def test_official_import_overrides(tmp_path):
    path, _ = release_checkpoint(tmp_path, "plain")
    out = tmp_path / "m.safetensors"
    convert_ckpt.main(
        [
            "--from-official",
            str(path),
            "--out",
            str(out),
            "--arch-num-classes",
            "11",
            "--arch-class-dropout-prob",
            "0",
        ]
    )
    assert load_pretrained(out).num_classes == 11


class Payload:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_needing_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_model().state_dict(), "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match="needs arbitrary code to unpickle"):
        convert_ckpt.main(["--from-official", str(path), "--out", str(tmp_path / "x.safetensors")])
    assert not marker.exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_sample_cli_writes_png_of_expected_size(tmp_path):
    model = tiny_model(seed=2, num_classes=10)  # a digits-shaped pixel model: 3 x 8 x 8
    ckpt = save_pretrained(
        model.state_dict(), tmp_path / "digits.safetensors", architecture_of(model)
    )
    out = tmp_path / "grid.png"
    cmd = [
        sys.executable,
        str(ROOT / "launchers/sample.py"),
        "--ckpt",
        str(ckpt),
        "--classes",
        "1,2,3,4,5",
        "--cfg",
        "1.5",
        "--steps",
        "4",
        "--sampler",
        "sde",
        "--seed",
        "0",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    with Image.open(out) as image:
        # 5 images on a 3-column grid, each 8 px enlarged 8x to 64 px, a gap between cells
        assert image.size == (3 * 64 + 2 * GAP_PX, 2 * 64 + GAP_PX)
        assert image.mode == "RGB"
    first = out.read_bytes()
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert out.read_bytes() == first, "same seed, same grid"


def test_sample_cli_rejects_bad_classes(tmp_path):
    model = tiny_model(num_classes=10)
    ckpt = save_pretrained(model.state_dict(), tmp_path / "m.safetensors", architecture_of(model))
    sample_cli = load_tool("launchers/sample.py")
    with pytest.raises(SystemExit, match=r"--classes \[12\] out of range"):
        sample_cli.main(
            ["--ckpt", str(ckpt), "--classes", "1,12", "--out", str(tmp_path / "g.png")]
        )


# ---------------------------------------------------------------------- the one loader
def test_load_pretrained_takes_run_step_and_root_directories(tmp_path):
    """A run directory (its ema.safetensors), a checkpoint step directory (verified against
    its meta.json) and a checkpoint root (the newest complete step) all load."""
    import hashlib
    import json

    old, new = tiny_model(seed=1), tiny_model(seed=2)
    run = tmp_path / "run"
    save_pretrained(new.state_dict(), run / "ema.safetensors", architecture_of(new))
    root = run / "checkpoints"
    for step, model in ((10, old), (20, new)):
        step_dir = root / f"step_{step:09d}"
        path = save_pretrained(
            model.state_dict(), step_dir / "ema.safetensors", architecture_of(model)
        )
        data = path.read_bytes()
        record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (step_dir / "meta.json").write_text(
            json.dumps({"step": step, "files": {path.name: record}})
        )
    (root / "step_000000030").mkdir()  # an interrupted save: no meta.json, ignored
    x, t, y = sequence()
    for where, expected in ((run, new), (root, new), (root / "step_000000010", old)):
        assert torch.equal(load_pretrained(where)(x, t, y), expected(x, t, y)), where

    ema = root / "step_000000020" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-8] ^= 0xFF  # a flipped bit inside a tensor: safetensors alone would load it
    ema.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="step_000000020: ema.safetensors: checksum mismatch"):
        load_pretrained(root)
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_pretrained(tmp_path / "run" / "checkpoints" / "step_000000030")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_load_pretrained_names_a_corrupt_file(tmp_path):
    model = tiny_model()
    path = save_pretrained(model.state_dict(), tmp_path / "m.safetensors", architecture_of(model))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file"):
        load_pretrained(path)


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_convert_reports_a_corrupt_file_as_corrupt(tmp_path, damage):
    path, _ = release_checkpoint(tmp_path, "plain")
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[40:200] = bytes(160)  # zeroed inside the pickle
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path} is corrupt") as info:
        convert_ckpt.main(["--from-official", str(path), "--out", str(tmp_path / "x.safetensors")])
    assert "arbitrary code" not in str(info.value)


def test_causal_softmax_architecture_round_trip(tmp_path):
    model = tiny_model(attention="causal_softmax", hidden_size=128, num_heads=2)
    arch = architecture_of(model)
    assert arch["attention"] == "causal_softmax"
    inferred = infer_architecture(model.state_dict())
    assert inferred == dict(arch, num_heads=2)  # heads: 64 channels each, as in the zoo
    path = save_pretrained(model.state_dict(), tmp_path / "c.safetensors", arch)
    x, t, y = sequence()
    assert torch.equal(load_pretrained(path)(x, t, y), model(x, t, y))


def test_convert_a_trainer_checkpoint_and_name_its_damage(tmp_path):
    """A checkpoint written by the checkpoint component converts to a file load_pretrained reads;
    a damaged one is reported with the file and step, not converted."""
    from arflow.checkpoint import CheckpointError, CheckpointManager
    from arflow.distributed.env import DistInfo

    model = tiny_model(seed=4)
    arch = architecture_of(model)
    config = {"model": {"name": "ARFlow-S/2", **arch}, "parallel": {"backend": "ddp"}}
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    manager = CheckpointManager(str(tmp_path / "ckpt"), info, background=False)
    step_dir = manager.save(
        7,
        stage_state=lambda path, copy: lambda recorder, group: None,
        rank_state={},
        ema=model.state_dict(),
        arch=arch,
        config=config,
    )
    out = tmp_path / "converted.safetensors"
    convert_ckpt.main([str(tmp_path / "ckpt"), "--out", str(out)])
    x, t, y = sequence()
    assert torch.equal(load_pretrained(out)(x, t, y), model(x, t, y))
    assert torch.equal(load_pretrained(step_dir)(x, t, y), model(x, t, y))

    ema = Path(step_dir) / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-4] ^= 0x01
    ema.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"\(step 7\) is damaged: ema.safetensors: checksum"):
        convert_ckpt.main([step_dir, "--out", str(tmp_path / "again.safetensors")])
    assert not (tmp_path / "again.safetensors").exists()
