"""benchmarks/gpu_suite.sh rehearsed on the CPU: its --dry-run runs every step with tiny shapes
and writes one JSON document with every section; a failing step and a spent time budget are
recorded and the suite still finishes and writes the document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "suite",
    "environment",
    "wheels",
    "gpu_tests",
    "attention",
    "train_step",
    "fid_sampling",
    "checkpoint",
    "goals",
    "steps",
}
STATUSES = {"ok", "failed", "timeout", "skipped"}


def dry_run(out: Path, timeout: float, **env) -> dict:
    environ = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry-run"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "[gpu-suite" in proc.stdout  # progress lines
    assert (out / "gpu_suite.log").stat().st_size > 0
    return json.loads((out / "gpu_suite.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is for machines without CUDA")
def test_dry_run_runs_every_step_and_fills_every_section(tmp_path):
    report = dry_run(tmp_path, timeout=600)
    assert set(report) == SECTIONS and report["suite"]["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == [
        "install",
        "env",
        "gpu_tests",
        "attention",
        "train_step.tiny-zero2-compile",
        "train_step.tiny-fsdp2-eager",
        "fid_sampling",
        "checkpoint",
    ]
    failed = {n: s for n, s in steps.items() if s["status"] != "ok"}
    if (ROOT / ".wheels").is_dir():  # made by benchmarks/build_gpu_wheels.sh (not in CI)
        assert report["wheels"]["installed"] and report["wheels"]["unmet_requirements"] == []
    else:
        assert failed.pop("install")["status"] == "skipped"
    assert not failed, failed

    assert report["environment"]["device"] == "cpu"
    tests = report["gpu_tests"]
    assert tests["skipped"] == len(tests["tests"]) >= 5  # no CUDA here: each skipped ...
    assert all(t["message"] for t in tests["tests"])  # ... with its reason
    assert {"test_gpu::test_small_model_learns_in_bf16_with_compile[deepspeed]"} <= {
        t["test"] for t in tests["tests"]
    }
    attention = report["attention"]
    assert attention["block"]["block_ratio"] > 0 and attention["sampling"]["sampling_ratio"] > 0
    has_switch = report["environment"]["parallel_compile_key"]
    compiled = {"tiny-fsdp2-eager": False if has_switch else None}
    if has_switch:
        compiled["tiny-zero2-compile"] = True
    else:  # a tree without the parallel.compile switch says so instead of failing
        assert "not a config key" in report["train_step"]["tiny-zero2-compile"]["skipped"]
    for case, compile in compiled.items():
        result = report["train_step"][case]
        assert result["images_per_s"] > 0 and result["flops_per_image"] > 0, (case, result)
        assert result["compile"] is compile, (case, result)
    assert report["fid_sampling"]["runs"][0]["samples_per_s_per_rank"] > 0
    local = report["checkpoint"]["local"]
    assert local["sync_s"] > 0 and local["async_stall_s"] > 0 and local["stall_ratio"] > 0
    goals = report["goals"]
    assert goals["checkpoint_stall_over_sync_save"]["value"] == local["stall_ratio"]
    assert goals["sampling_ratio_step250_over_step1"]["value"] > 0
    assert goals["gpu_tests_without_failures"]["met"] is True


@pytest.mark.slow
def test_a_failing_step_and_a_spent_budget_are_recorded(tmp_path):
    """A wheel folder that cannot be installed fails the install step (named in its error);
    with a 30 s budget the later steps are cut or skipped; the suite still ends normally and
    the document has every section, the missing ones holding the reason."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    report = dry_run(tmp_path / "out", timeout=300, WHEELS=str(wheels), GPU_SUITE_BUDGET_S="30")
    assert set(report) == SECTIONS
    steps = {s["name"]: s for s in report["steps"]}
    assert set(steps) >= {"install", "env", "fid_sampling"}
    assert all(s["status"] in STATUSES for s in steps.values())
    assert steps["install"]["status"] == "failed" and "broken-1.0" in steps["install"]["error"]
    assert report["wheels"] == {"failed": steps["install"]["error"][-500:]}
    assert steps["env"]["status"] == "ok"  # the suite went on after the failure
    cut = [s for s in steps.values() if s["status"] in ("skipped", "timeout")]
    assert cut and all(s.get("reason") or s.get("error") for s in cut)
    assert steps["fid_sampling"]["status"] == "skipped"
    assert report["fid_sampling"] == {"skipped": "suite budget of 30 s spent"}
