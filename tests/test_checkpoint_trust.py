"""Nothing in a checkpoint root is trusted: meta.json's file list (absolute paths, `..`, links,
devices, impossible sizes) and HEAD.json (its type, its lineage, its `from`) are checked before
anything is opened or resumed, and what fails is named; `--resume auto` never guesses."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_checkpoint import info, opened, save  # noqa: F401 (info: the process-group fixture)

from arflow.checkpoint import HEAD, META, CheckpointDirInUse, CheckpointRoot, step_dir_name

ROOT = Path(__file__).resolve().parents[1]


def forge(step_dir: Path, rel: str, record: dict) -> None:
    """List `rel` in meta.json with `record`, as someone who can write the store would."""
    meta = json.loads((step_dir / META).read_text())
    meta["files"][rel] = record
    (step_dir / META).write_text(json.dumps(meta))


def two_checkpoints(tmp_path, info):  # noqa: F811
    manager = opened(tmp_path, info, keep_last=5)
    save(manager, 1, "one")
    save(manager, 2, "two")
    manager.close()
    return tmp_path / step_dir_name(2)


def record_of(path: str) -> dict:
    data = Path(path).read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "rel, why",
    [
        ("/dev/zero", "an absolute path"),
        ("../../../../../../etc/passwd", "'..' parts"),
        ("trainer/../../../etc/passwd", "'..' parts"),
        ("zero\\..\\x", "backslash"),
    ],
)
def test_listed_paths_outside_the_step_directory_are_refused(tmp_path, info, rel, why, capsys):  # noqa: F811
    step_dir = two_checkpoints(tmp_path, info)
    forge(step_dir, rel, {"size": 0, "sha256": "0" * 64})
    resumed = opened(tmp_path, info, resume="auto")
    out = capsys.readouterr().out
    assert resumed.start.step == 1  # fell back, never opened the listed path
    assert f"{step_dir}/{META} is corrupt or forged (listed file {rel!r}" in out and why in out
    resumed.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["link", "fifo", "device-link", "huge"])
def test_listed_files_that_are_not_plain_files_are_refused(tmp_path, info, kind, capsys):  # noqa: F811
    step_dir = two_checkpoints(tmp_path, info)
    target = step_dir / "payload.txt"
    if kind == "link":  # a link to a real file outside, recorded with that file's checksum
        target.unlink()
        target.symlink_to("/etc/passwd")
        forge(step_dir, "payload.txt", record_of("/etc/passwd"))
        why = "resolves outside the checkpoint"
    elif kind == "fifo":  # opening a FIFO for reading blocks forever
        target.unlink()
        os.mkfifo(target)
        forge(step_dir, "payload.txt", {"size": 0, "sha256": hashlib.sha256().hexdigest()})
        why = "not a regular file"
    elif kind == "device-link":
        os.symlink("/dev/zero", step_dir / "trainer" / "zeros")
        forge(step_dir, "trainer/zeros", {"size": 0, "sha256": hashlib.sha256().hexdigest()})
        why = "resolves outside the checkpoint"
    else:
        forge(step_dir, "payload.txt", {"size": 1 << 60, "sha256": "0" * 64})
        why = "is not a number of bytes"
    resumed = opened(tmp_path, info, resume="auto")
    assert resumed.start.step == 1
    assert why in capsys.readouterr().out
    resumed.close()


@pytest.mark.slow  # a subprocess of the conversion tool
def test_convert_refuses_a_forged_listing_at_once(tmp_path, info):  # noqa: F811
    """tools/convert_ckpt.py on a step directory listing /dev/zero: a clear error in seconds
    (it used to read /dev/zero without end)."""
    step_dir = two_checkpoints(tmp_path, info)
    forge(step_dir, "/dev/zero", {"size": 0, "sha256": "0" * 64})
    proc = subprocess.run(
        [sys.executable, "tools/convert_ckpt.py", str(step_dir), "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "listed file '/dev/zero': an absolute path" in proc.stderr
    assert not (tmp_path / "x").exists()


def write_head(root: Path, content) -> None:
    (root / HEAD).write_text(json.dumps(content))


def test_resume_auto_refuses_complete_checkpoints_of_an_unknown_lineage(tmp_path, info):  # noqa: F811
    two_checkpoints(tmp_path, info)
    write_head(tmp_path, {"run": "stranger", "lineage": [{"run": "stranger"}], "from": None})
    with pytest.raises(CheckpointDirInUse) as refused:
        opened(tmp_path, info, resume="auto")
    message = str(refused.value)
    assert "holds complete checkpoints (steps 1, 2) but none of the lineage" in message
    assert "--resume PATH" in message and "--overwrite" in message
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [step_dir_name(1), step_dir_name(2)]


@pytest.mark.parametrize(
    "content, problem",
    [
        ([{"run": "x"}], "a JSON list, not an object"),
        ({"run": "x", "lineage": []}, "lineage is not a non-empty list"),
        ({"run": "x", "lineage": [{"run": 3}]}, "lineage is not a non-empty list"),
        ({"run": "x", "lineage": [{"run": "x"}], "from": 7}, "'from' is neither"),
        ({"lineage": [{"run": "x"}]}, "no run id"),
    ],
)
def test_a_malformed_head_is_named_not_a_type_error(tmp_path, info, content, problem):  # noqa: F811
    two_checkpoints(tmp_path, info)
    write_head(tmp_path, content)
    with pytest.raises(CheckpointDirInUse, match=f"{HEAD} is corrupt \\({problem}"):
        CheckpointRoot(str(tmp_path)).resume_candidates()


def test_head_from_outside_the_root_is_never_a_candidate(tmp_path, info):  # noqa: F811
    other = tmp_path / "other"
    two_checkpoints(other, info)
    mine = tmp_path / "mine"
    mine.mkdir()
    outside = str(other / step_dir_name(2))
    write_head(
        mine, {"run": "r", "lineage": [{"run": "o", "until": 2}, {"run": "r"}], "from": outside}
    )
    with pytest.raises(CheckpointDirInUse, match=f"started from {outside}, outside") as refused:
        CheckpointRoot(str(mine)).resume_candidates()
    assert f"--resume {outside}" in str(refused.value)
    # With checkpoints of its own lineage here, those are the candidates, never the outside one.
    run = opened(mine, info, resume=outside)
    save(run, 3)
    run.close()
    assert [f.step for f in CheckpointRoot(str(mine)).resume_candidates()] == [3]
