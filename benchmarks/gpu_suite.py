#!/usr/bin/env python
"""The Python half of benchmarks/gpu_suite.sh: the steps that are easier to get right in Python.

    python benchmarks/gpu_suite.py env                                # machine and versions, JSON
    python benchmarks/gpu_suite.py install WHEELS TARGET [--for-python 3.12]
    python benchmarks/gpu_suite.py merge WORK OUT_JSON [--dry-run]

`install` puts into TARGET (a folder for PYTHONPATH) every wheel of WHEELS whose package the
running Python lacks or holds in an older version, without dependencies and without an index,
then lists the requirements of what it installed that nothing on the path satisfies. With
`--for-python` it installs every wheel for that CPython on x86-64 manylinux instead (the
rehearsal on another machine: the folder is complete and installable there).

`merge` reads the step records (steps.jsonl: name, status, rc, seconds, limit_s) and each step's
output in WORK, and writes the suite's one JSON document (layout in gpu_suite.sh).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PACKAGES = [  # versions reported in the environment section
    "torch",
    "triton",
    "numpy",
    "deepspeed",
    "pydantic",
    "webdataset",
    "diffusers",
    "torch-fidelity",
    "flash-attn",
]
ERROR_LINES = 30


# ----------------------------------------------------------------------------------- env
def environment() -> dict:
    import torch

    from arflow.config import ParallelConfig

    cuda = torch.cuda.is_available()
    report = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda_available": cuda,
        "torch_cuda": torch.version.cuda,
        "packages": {name: _version(name) for name in PACKAGES},
        "parallel_compile_key": "compile" in ParallelConfig.__dataclass_fields__,
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report.update(
            device=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    else:
        report["device"] = "cpu"
    return report


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ------------------------------------------------------------------------------- install
def install(wheels: Path, target: Path, for_python: str | None) -> dict:
    from packaging.utils import parse_wheel_filename

    chosen, present = [], {}
    for wheel in sorted(wheels.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        have = _version(name)
        if for_python is None and have is not None and _at_least(have, version):
            present[str(name)] = have
        else:
            chosen.append(wheel)
    if not chosen and not present:
        raise SystemExit(f"no wheels in {wheels} (benchmarks/build_gpu_wheels.sh builds them)")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
    if for_python:
        cmd += ["--only-binary=:all:", "--implementation", "cp", "--python-version", for_python]
        for tag in PLATFORMS:
            cmd += ["--platform", tag]
    t0 = time.perf_counter()
    if chosen:
        subprocess.run(cmd + [str(w) for w in chosen], check=True)
    return {
        "installed": [w.name for w in chosen],
        "already_present": present,
        "target_python": for_python or platform.python_version(),
        "seconds": round(time.perf_counter() - t0, 1),
        "unmet_requirements": unmet_requirements(target, for_python),
    }


def _at_least(have: str, version) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(have) >= version
    except InvalidVersion:
        return False


def unmet_requirements(target: Path, for_python: str | None) -> list[str]:
    """Requirements of the distributions in `target` that neither `target` nor the running
    Python's path satisfies (markers evaluated for `for_python` when given)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {"extra": ""}
    if for_python:
        env.update(python_version=for_python, python_full_version=f"{for_python}.0")
    path = [str(target), *sys.path]
    available = {}
    for dist in metadata.distributions(path=path):  # the first on the path wins, as at import
        available.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    unmet = []
    for dist in metadata.distributions(path=[str(target)]):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate(env):
                continue
            have = available.get(canonicalize_name(req.name))
            if have is None or not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} needs {req}: found {have or 'none'}")
    return sorted(set(unmet))


# --------------------------------------------------------------------------------- merge
def junit_summary(path: Path) -> dict:
    """Per-test outcome, seconds and message (skip reason, failure) of a pytest junit XML."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "failed" if kind == "failure" else kind
                message = (node.get("message") or node.text or "")[-1500:]
                break
        module = case.get("classname", "").removeprefix("tests.")
        tests.append(
            {
                "test": f"{module}::{case.get('name')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0), 2),
                "message": message,
            }
        )
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error")}
    counts["skipped"] = sum(t["outcome"] == "skipped" for t in tests)
    return {**counts, "tests": tests}


def read_json_output(path: Path):
    """The step's JSON document: its whole stdout, or else the last line that parses."""
    if not path.exists():
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        for line in reversed(text.splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def tail(path: Path, lines: int = ERROR_LINES) -> str:
    return (
        "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
    )


def goals(report: dict) -> dict:
    """The issue's targets next to the figures that decide them (null when not measured)."""
    attention = report.get("attention") or {}
    compiled = (attention.get("block_compiled") or {}).get("block_ratio")
    eager = (attention.get("block") or {}).get("block_ratio")
    sampling = (attention.get("sampling") or {}).get("sampling_ratio")
    mfu = [
        r["mfu"]
        for name, r in (report.get("train_step") or {}).items()
        if name.startswith("xl2-") and isinstance(r, dict) and r.get("mfu") is not None
    ]
    tests = report.get("gpu_tests") or {}
    stall = ((report.get("checkpoint") or {}).get("local") or {}).get("stall_ratio")

    def goal(value, target, below=True):
        met = None if value is None else (value <= target if below else value >= target)
        return {"value": value, "target": target, "met": met}

    return {
        "block_ratio_compiled_bf16": goal(compiled, 1.10),
        "block_ratio_eager_bf16": goal(eager, 1.10),
        "sampling_ratio_step250_over_step1": goal(sampling, 1.05),
        "xl2_best_mfu": goal(max(mfu) if mfu else None, 0.45, below=False),
        "checkpoint_stall_over_sync_save": goal(stall, 0.20),
        "gpu_tests_without_failures": goal(
            tests.get("failed", 0) + tests.get("error", 0) if "tests" in tests else None, 0
        ),
    }


def merge(work: Path, out: Path, dry_run: bool, started: float) -> dict:
    report = {
        "suite": {
            "dry_run": dry_run,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
        },
        "environment": None,
        "wheels": None,
        "gpu_tests": None,
        "attention": None,
        "train_step": {},
        "fid_sampling": None,
        "checkpoint": None,
        "goals": None,
        "steps": [],
    }
    records = work / "steps.jsonl"
    for line in records.read_text().splitlines() if records.exists() else []:
        step = json.loads(line)
        name = step["name"]
        if step["status"] not in ("ok", "skipped"):
            output = tail(work / f"{name}.err") or tail(work / f"{name}.out")
            if step["status"] == "timeout":
                output = f"stopped at its {step['limit_s']} s limit\n{output}".strip()
            step["error"] = output
        report["steps"].append(step)
        if name == "gpu_tests":
            xml = work / "gpu_tests.xml"
            value = junit_summary(xml) if xml.exists() else None
        else:
            value = read_json_output(work / f"{name}.out")
        if value is None:  # a skipped or failed step still leaves its section with the reason
            value = {step["status"]: step.get("reason") or step.get("error", "")[-500:]}
        if name.startswith("train_step."):  # the script's output is {case: result}
            case = name.removeprefix("train_step.")
            report["train_step"][case] = value.get(case, value)
        elif name == "install":
            report["wheels"] = value
        elif name == "env":
            report["environment"] = value
        else:
            report[name] = value
    report["goals"] = goals(report)
    if dry_run:
        report["goals"]["note"] = "dry run: tiny shapes on a CPU; the figures rehearse the path"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    p = sub.add_parser("install")
    p.add_argument("wheels", type=Path)
    p.add_argument("target", type=Path)
    p.add_argument("--for-python", help="install every wheel for this CPython (rehearsal)")
    p = sub.add_parser("merge")
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--started", type=float, default=time.time())
    args = parser.parse_args()
    if args.command == "env":
        print(json.dumps(environment(), indent=1))
    elif args.command == "install":
        print(json.dumps(install(args.wheels, args.target, args.for_python), indent=1))
    else:
        report = merge(args.work, args.out, args.dry_run, args.started)
        failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
        print(f"wrote {args.out}; steps not ok: {failed or 'none'}")


if __name__ == "__main__":
    main()
