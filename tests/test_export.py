"""Weight files in both formats (one self-describing .safetensors, a Hugging Face Hub folder),
the check of their metadata against their tensors, public-release import and the sampling CLI."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import sequence, tiny_model

from arflow.cli import main as arflow
from arflow.models import (
    ARFlow,
    architecture_of,
    infer_architecture,
    load_pretrained,
    save_pretrained,
)
from arflow.models.hub import card_text, last_evaluation
from arflow.models.pretrained import ARCH_KEY, save_hub_folder
from arflow.utils.images import GAP_PX

ROOT = Path(__file__).resolve().parents[1]


def convert(*argv: str) -> int:
    """`arflow convert ARGV`: its exit status."""
    return arflow(["convert", *argv])


def convert_error(capsys, *argv: str) -> str:
    """`arflow convert ARGV` expected to fail: its one-line error (status 1, nothing written)."""
    assert convert(*argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("arflow convert: error: "), err
    return err.splitlines()[-1]


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
    with pytest.raises(ValueError, match=r"1 missing key\(s\): blocks.1.attn.gt_proj.weight"):
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
    assert convert("--from-official", str(path), "--out", str(out)) == 0
    assert "inferred architecture (custom)" in capsys.readouterr().err
    model = load_pretrained(out)
    x, t, y = sequence()
    assert torch.equal(model(x, t, y), expected(x, t, y))


def test_official_import_no_ema_and_to_pt(tmp_path):
    path, _ = release_checkpoint(tmp_path, "training")
    raw = tiny_model(seed=8, num_classes=10)
    out = tmp_path / "raw.pt"
    assert convert("--from-official", str(path), "--no-ema", "--to-pt", "--out", str(out)) == 0
    state = torch.load(out, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in raw.state_dict().items())


def test_official_import_overrides(tmp_path):
    path, _ = release_checkpoint(tmp_path, "plain")
    out = tmp_path / "m.safetensors"
    status = convert(
        "--from-official",
        str(path),
        "--out",
        str(out),
        "--arch-num-classes",
        "11",
        "--arch-class-dropout-prob",
        "0",
    )
    assert status == 0
    assert load_pretrained(out).num_classes == 11


class Payload:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_needing_code_is_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_model().state_dict(), "extra": Payload(marker)}, path)
    err = convert_error(
        capsys, "--from-official", str(path), "--out", str(tmp_path / "x.safetensors")
    )
    assert "needs arbitrary code to unpickle" in err
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
    with pytest.raises(SystemExit, match=r"--classes \[12\] out of range"):
        arflow(
            ["sample", "--ckpt", str(ckpt), "--classes", "1,12", "--out", str(tmp_path / "g.png")]
        )


# ---------------------------------------------------------------------- the one loader
def test_run_step_and_root_directories_follow_the_resume_rule(tmp_path):
    """load_pretrained takes a run directory (its ema.safetensors) and a step directory (checked
    against its meta.json); a checkpoint root stands for the checkpoint `--resume auto` would
    take (arflow.checkpoint.weights_file, what `arflow sample` and `evaluate` use). After a
    rollback that is the new branch's newest step, not the moved-aside
    `step_X.abandoned-<run>` that a listing sorts after it."""
    from arflow.checkpoint import CheckpointManager
    from arflow.checkpoint.locate import weights_file
    from arflow.distributed.env import DistInfo

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    models = {seed: tiny_model(seed=seed) for seed in (1, 2, 3, 4)}
    root = tmp_path / "run" / "checkpoints"

    def run(resume, saves):
        manager = CheckpointManager(str(root), info, keep_last=5, background=False)
        manager.open()
        manager.resume_target(resume, overwrite=False)
        for step, seed in saves:
            manager.save(
                step,
                stage_state=lambda path, stage: lambda recorder, group: None,
                rank_state={},
                ema=models[seed].state_dict(),
                arch=architecture_of(models[seed]),
                config={},
            )
        manager.close()

    run(None, [(10, 1), (20, 2), (30, 3)])
    run(str(root / "step_000000020"), [(30, 4)])  # a rollback: the old step 30 moved aside
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))[-1].startswith(
        "step_000000030.abandoned-"
    )
    save_pretrained(
        models[4].state_dict(), tmp_path / "run" / "ema.safetensors", {**architecture_of(models[4])}
    )
    x, t, y = sequence()
    for where, seed in (
        (tmp_path / "run", 4),
        (weights_file(root), 4),
        (root / "step_000000010", 1),
        (weights_file(root / "step_000000020"), 2),
    ):
        assert torch.equal(load_pretrained(where)(x, t, y), models[seed](x, t, y)), where

    ema = root / "step_000000030" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-8] ^= 0xFF  # a flipped bit inside a tensor: safetensors alone would load it
    ema.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="step_000000030: ema.safetensors: checksum mismatch"):
        load_pretrained(weights_file(root))
    (root / "step_000000040").mkdir()  # an interrupted save: no meta.json, no weights
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        weights_file(root / "step_000000040")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_pretrained(root)  # a root is the checkpoint component's to resolve
    with pytest.raises(FileNotFoundError, match="do not exist"):
        weights_file(tmp_path / "nowhere")


def test_load_pretrained_names_a_corrupt_file(tmp_path):
    model = tiny_model()
    path = save_pretrained(model.state_dict(), tmp_path / "m.safetensors", architecture_of(model))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file"):
        load_pretrained(path)


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_convert_reports_a_corrupt_file_as_corrupt(tmp_path, damage, capsys):
    path, _ = release_checkpoint(tmp_path, "plain")
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[40:200] = bytes(160)  # zeroed inside the pickle
    path.write_bytes(bytes(data))
    err = convert_error(
        capsys, "--from-official", str(path), "--out", str(tmp_path / "x.safetensors")
    )
    assert f"{path} is corrupt" in err and "arbitrary code" not in err


def test_causal_softmax_architecture_round_trip(tmp_path):
    model = tiny_model(attention="causal_softmax", hidden_size=128, num_heads=2)
    arch = architecture_of(model)
    assert arch["attention"] == "causal_softmax"
    inferred = infer_architecture(model.state_dict())
    assert inferred == dict(arch, num_heads=2)  # heads: 64 channels each, as in the zoo
    path = save_pretrained(model.state_dict(), tmp_path / "c.safetensors", arch)
    x, t, y = sequence()
    assert torch.equal(load_pretrained(path)(x, t, y), model(x, t, y))


def test_convert_a_trainer_checkpoint_and_name_its_damage(tmp_path, capsys):
    """A checkpoint written by the checkpoint component converts to a file load_pretrained reads,
    and with --hub to a Hub folder whose card names the step and the run's last FID; a damaged
    one is reported with the file and step, not converted."""
    from arflow.checkpoint import CheckpointManager
    from arflow.distributed.env import DistInfo

    model = tiny_model(seed=4)
    arch = architecture_of(model)
    run_dir = tmp_path / "run"
    config = {
        "model": {"name": "ARFlow-S/2", **arch},
        "parallel": {"backend": "ddp"},
        "run": {"dir": str(run_dir)},
    }
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 7, "eval/fid": 12.5}) + "\n")
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
    assert convert(str(tmp_path / "ckpt"), "--out", str(out)) == 0
    x, t, y = sequence()
    assert torch.equal(load_pretrained(out)(x, t, y), model(x, t, y))
    assert torch.equal(load_pretrained(step_dir)(x, t, y), model(x, t, y))
    hub = tmp_path / "hub"
    assert convert(str(tmp_path / "ckpt"), "--hub", "--out", str(hub)) == 0
    assert {p.name for p in hub.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    assert torch.equal(load_pretrained(hub)(x, t, y), model(x, t, y))
    card = (hub / "README.md").read_text()
    assert "Trained for 7 steps" in card and "12.5" in card, card  # the step, the last FID

    ema = Path(step_dir) / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-4] ^= 0x01
    ema.write_bytes(bytes(data))
    err = convert_error(capsys, step_dir, "--out", str(tmp_path / "again.safetensors"))
    assert re.search(r"\(step 7\) is damaged: ema.safetensors: checksum", err), err
    assert not (tmp_path / "again.safetensors").exists()


# ------------------------------------------------------------------ metadata against tensors
def run_python(code: str, **env: str) -> str:
    """`code` in a fresh interpreter (tests/ on its path), with extra environment variables;
    returns its stdout."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **env}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def with_metadata(tmp_path, **arch_changes) -> Path:
    """A small model's tensors in a file whose architecture metadata says otherwise."""
    from safetensors.torch import save_file

    model = tiny_model()
    arch = {**architecture_of(model), **arch_changes}
    path = tmp_path / "lying.safetensors"
    save_file(model.state_dict(), str(path), metadata={ARCH_KEY: json.dumps(arch)})
    return path


def test_metadata_claiming_a_huge_model_is_refused_before_allocation(tmp_path):
    """Depth 64 x width 32768 (1.3e12 parameters) over a 2-block, 32-wide file: refused from
    the header, with the differing keys and shapes, and the process's peak memory barely
    moves."""
    path = with_metadata(tmp_path, depth=64, hidden_size=32768)
    out = run_python(
        f"""
import json, resource, time
from arflow.models import load_pretrained
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    load_pretrained({str(path)!r})
except ValueError as err:
    message = str(err)
print(json.dumps(dict(
    message=message,
    seconds=time.perf_counter() - start,
    growth_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
)))
"""
    )
    result = json.loads(out)
    message = result["message"]
    assert f"{path} does not hold the model its metadata describes" in message
    assert '"depth": 64' in message and '"hidden_size": 32768' in message
    assert (
        "shape(s) differ: pos_embed: the architecture implies (1, 16, 32768), the weights hold "
        "(1, 16, 32); x_embedder.proj.weight: the architecture implies (32768, 3, 2, 2)" in message
    )
    assert "12 missing key(s): blocks.2.attn.q_proj.weight, " in message
    assert message.endswith("Blocks 3 to 63 are missing too.")
    assert result["growth_kib"] < 64 * 1024, result  # the claimed model: 5 TB in fp32
    assert result["seconds"] < 30, result


def test_metadata_that_disagrees_with_one_tensor_names_key_and_shapes(tmp_path):
    path = with_metadata(tmp_path, num_classes=7)  # the file's table has 5 + 1 rows
    with pytest.raises(ValueError) as info:
        load_pretrained(path)
    message = str(info.value)
    assert (
        "1 shape(s) differ: y_embedder.embedding_table.weight: the architecture implies "
        "(8, 32), the weights hold (6, 32)" in message
    )
    assert "missing" not in message and "unexpected" not in message
    assert "Missing key(s)" not in message  # torch's load_state_dict never got this far


def test_metadata_that_builds_no_model_is_named(tmp_path):
    path = with_metadata(tmp_path, num_heads=3)  # 32 channels do not split into 3 heads
    with pytest.raises(ValueError, match=r"its architecture .* builds no model: hidden size 32"):
        load_pretrained(path)


# --------------------------------------------------------------------------- Hub folders
def test_hub_folder_round_trip_offline(tmp_path):
    """save_pretrained then from_pretrained with HF_HUB_OFFLINE=1: equal outputs; the folder
    is config.json (the constructor arguments), model.safetensors and a model card."""
    folder = tmp_path / "hub"
    out = run_python(
        f"""
import json, torch
from tiny_models import sequence, tiny_model
from arflow.models import ARFlow, architecture_of
model = tiny_model(seed=5, attention="causal_softmax")
model.save_pretrained({str(folder)!r})
loaded = ARFlow.from_pretrained({str(folder)!r})
x, t, y = sequence()
print(json.dumps(dict(
    equal=torch.equal(loaded(x, t, y), model(x, t, y)),
    training=loaded.training,
    arch=architecture_of(loaded) == architecture_of(model),
)))
""",
        HF_HUB_OFFLINE="1",
    )
    assert json.loads(out) == {"equal": True, "training": False, "arch": True}
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["attention"] == "causal_softmax" and config["hidden_size"] == 32


def test_without_huggingface_hub_the_model_works_and_says_what_to_install(tmp_path):
    out = run_python(
        f"""
import sys
sys.modules["huggingface_hub"] = None  # as if not installed
import torch
from tiny_models import sequence, tiny_model
from arflow.models import architecture_of, load_pretrained, save_pretrained
model = tiny_model()
path = save_pretrained(model.state_dict(), {str(tmp_path / "m.safetensors")!r}, architecture_of(model))
x, t, y = sequence()
assert torch.equal(load_pretrained(path)(x, t, y), model(x, t, y))
try:
    model.save_pretrained({str(tmp_path / "hub")!r})
except ImportError as err:
    print(err)
"""
    )
    assert "ARFlow.save_pretrained writes a Hub folder: pip install 'arflow[hub]'" in out
    assert not (tmp_path / "hub").exists()


def metrics_file(run_dir: Path) -> Path:
    rows = [
        {"step": 10, "loss": 0.5},
        {"step": 20, "eval/fid": 30.5, "eval/inception_score": 2.0, "eval/num_samples": 500},
        {"step": 30, "eval/inception_score": 2.5},  # an evaluation without a reference: no FID
        {"step": 40, "eval/fid": 12.3456, "eval/num_samples": 1000, "loss": 0.1},
        {"step": 45, "loss": 0.09},
    ]
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 50, "eval/f')
    return path


def test_last_evaluation_reads_the_last_fid_row(tmp_path):
    metrics_file(tmp_path)
    expected = {"step": 40, "eval/fid": 12.3456, "eval/num_samples": 1000}
    assert last_evaluation(tmp_path) == expected
    assert last_evaluation(tmp_path / "metrics.jsonl") == expected
    assert last_evaluation(tmp_path / "elsewhere") is None


def test_hub_folder_from_a_state_dict_with_its_card(tmp_path):
    """save_hub_folder (the conversion path): from_pretrained gives the same model, and the
    card states the architecture, the training config and steps, the sampler and the FID."""
    from huggingface_hub import ModelCard

    from arflow.config import Config

    model = tiny_model(seed=6)
    config = Config().to_dict()
    config["train"]["steps"] = 100
    config["eval"]["sampler"]["steps"] = 17
    config["data"]["storage_options"] = {"key": "AKIA-NOT-FOR-A-CARD"}
    run = tmp_path / "run"
    run.mkdir()
    folder = save_hub_folder(
        model.state_dict(),
        tmp_path / "folder",
        architecture_of(model),
        config,
        step=50,
        metrics=metrics_file(run),
    )
    x, t, y = sequence()
    assert torch.equal(ARFlow.from_pretrained(folder)(x, t, y), model(x, t, y))

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "arflow" and "arflow" in card.data.tags
    text = card.text
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"| Parameters | {trainable:,} trainable" in text
    assert "| Depth / hidden size / heads | 2 / 32 / 2 |" in text
    assert "Trained for 50 steps of 100." in text
    assert "| steps | 17 |" in text  # the run's eval.sampler
    assert "FID 12.35 at step 40 (1,000 samples)" in text
    dumped = json.loads(text.split("```json\n")[1].split("\n```")[0])
    assert dumped["data"]["storage_options"] == "<withheld>"
    assert "AKIA" not in text
    assert {k: v for k, v in dumped.items() if k != "data"} == {
        k: v for k, v in config.items() if k != "data"
    }
    assert not (tmp_path / "folder.tmp").exists()


def test_card_names_a_zoo_model_and_says_when_nothing_was_recorded():
    from arflow.config import model_kwargs

    arch = dict(
        architecture_of(tiny_model()),
        input_size=32,
        in_channels=4,
        num_classes=1000,
        **model_kwargs("ARFlow-XL/2"),
    )
    text = card_text(arch, (712_445_216, 712_740_128))
    assert text.startswith("# ARFlow-XL/2\n")
    assert "| Parameters | 712,445,216 trainable (712,740,128 with the fixed positions) |" in text
    assert "No training record came with these weights." in text
    assert "| steps | 250 |" in text  # SamplerConfig's defaults
    assert "No FID was recorded for these weights." in text


def test_hub_folder_refusals(tmp_path):
    model = tiny_model()
    folder = save_hub_folder(model.state_dict(), tmp_path / "f", architecture_of(model))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="f exists and is not an empty directory"):
        save_hub_folder(model.state_dict(), folder, architecture_of(model))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError) as info:
        ARFlow.from_pretrained(folder)
    assert f"{folder} (model.safetensors against config.json) does not hold" in str(info.value)
    assert "x_embedder.proj.weight: the architecture implies (64, 3, 2, 2), the weights hold " in (
        str(info.value)
    )
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ARFlow.from_pretrained(folder)
