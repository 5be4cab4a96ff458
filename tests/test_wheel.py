"""The built wheel, installed with its `train` extra into a fresh venv, runs the whole digits
workflow from an empty directory outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Not copied from the checkout's root: build outputs, the venv, run outputs (arflow/data is code).
NOT_SOURCE = {"build", "dist", ".venv", ".git", "runs", "data", "wandb"}


def not_source(folder: str, names: list[str]) -> list[str]:
    at_root = Path(folder) == ROOT
    return [
        n
        for n in names
        if (at_root and n in NOT_SOURCE) or n == "__pycache__" or n.endswith(".egg-info")
    ]


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_trains_samples_and_converts_without_the_checkout(tmp_path):
    # Build from a copy of the source tree, so nothing is written into the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=not_source)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    run([*build, "-w", str(tmp_path / "dist"), str(src)], tmp_path, dict(os.environ))
    (wheel,) = (tmp_path / "dist").glob("arflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        scripts = archive.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "arflow").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
    assert {f"arflow/configs/{c}.json" for c in ("xl_256", "digits_cpu")} <= set(names)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "arflow = arflow.cli:main" in scripts
    for extra, package in (("eval", "torch-fidelity"), ("vae", "diffusers"), ("all", "arflow")):
        assert f"Provides-Extra: {extra}" in metadata
        assert any(
            line.startswith(f"Requires-Dist: {package}") and f'extra == "{extra}"' in line
            for line in metadata.splitlines()
        ), (extra, package)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, dict(os.environ))
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", WANDB_MODE="disabled")
    run([str(bin_dir / "python"), "-m", "pip", "install", f"{wheel}[train]"], tmp_path, env, 1200)

    work = tmp_path / "work"  # empty, outside the checkout
    work.mkdir()
    where = run(
        [
            str(bin_dir / "python"),
            "-c",
            "import arflow, sys; print(arflow.__file__); print(sys.path)",
        ],
        work,
        env,
    ).stdout.splitlines()
    assert Path(where[0]).is_relative_to(venv), where[0]
    assert str(ROOT) not in where[1]

    def arflow(*argv: str) -> subprocess.CompletedProcess:
        return run([str(bin_dir / "arflow"), *argv], work, env)

    assert "digits_cpu" in arflow("config", "--list").stdout
    arflow("make-shards", "digits", "--out", "data/digits", "--image-size", "8", "--no-progress")
    assert len(json.loads((work / "data/digits/manifest.json").read_text())["classes"]) == 10
    # One process; ddp instead of the config's deepspeed backend, whose CPU ops would be
    # compiled (minutes) into the machine's shared extension cache.
    arflow(
        "train",
        "--config",
        "digits_cpu",
        "--set",
        "train.steps=4",
        "--set",
        "checkpoint.every=2",
        "--set",
        "parallel.backend=ddp",
        "--set",
        "logging.progress=false",
    )
    run_dir = work / "runs/digits_cpu"
    assert (run_dir / "ema.safetensors").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_000000002",
        "step_000000004",
    ]
    grid = ["--classes", "0,1,2,3", "--steps", "3", "--sampler", "euler", "--device", "cpu"]
    arflow("sample", "--ckpt", "runs/digits_cpu", *grid, "--out", "run.png")
    arflow("convert", "runs/digits_cpu/checkpoints", "--out", "digits.safetensors")
    arflow("sample", "--ckpt", "digits.safetensors", *grid, "--out", "converted.png")
    # The newest checkpoint's EMA, converted, samples the same images as the run's export.
    assert (work / "converted.png").read_bytes() == (work / "run.png").read_bytes()

    # Without the eval extra, evaluation names the extra the wheel really offers.
    proc = subprocess.run(
        [str(bin_dir / "arflow"), "fid", "distance", "digits.safetensors", "digits.safetensors"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "pip install 'arflow[eval]'" in proc.stderr, proc.stderr
