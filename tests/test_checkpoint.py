"""CheckpointManager: atomic commit, discovery of the latest complete checkpoint, keep_last,
clean-up of interrupted saves, and fsspec URLs (the staged upload / download path)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed as dist

from arflow.distributed.checkpoint import META, CheckpointManager, fetch, step_dir_name
from arflow.distributed.env import DistInfo, free_port


@pytest.fixture(scope="module")
def info():
    """A one-process gloo group (the manager synchronises ranks with barriers)."""
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dist.destroy_process_group()


def writer(payload: str):
    def write(local_dir: str) -> None:
        with open(os.path.join(local_dir, "payload.txt"), "w") as f:
            f.write(payload)

    return write


def test_commit_latest_and_keep_last(tmp_path, info):
    manager = CheckpointManager(str(tmp_path / "ckpt"), info, keep_last=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        manager.save(step, writer(f"s{step}"), {"world_size": 1})
    assert manager.complete_steps() == [20, 30]
    latest = manager.latest()
    assert latest.step == 30 and latest.meta["world_size"] == 1
    assert (tmp_path / "ckpt" / step_dir_name(30) / "payload.txt").read_text() == "s30"
    # A root or a step directory both resolve.
    assert manager.find(str(tmp_path / "ckpt")).step == 30
    assert manager.find(str(tmp_path / "ckpt" / step_dir_name(20))).step == 20


def test_interrupted_save_is_ignored_then_removed(tmp_path, info):
    manager = CheckpointManager(str(tmp_path / "ckpt"), info, keep_last=3)
    manager.save(5, writer("good"), {"world_size": 1})

    def crash(local_dir: str) -> None:
        writer("partial")(local_dir)
        raise KeyboardInterrupt  # the process dies after writing some files, before the commit

    with pytest.raises(KeyboardInterrupt):
        manager.save(10, crash, {"world_size": 1})
    assert (tmp_path / "ckpt" / step_dir_name(10) / "payload.txt").exists()
    assert not (tmp_path / "ckpt" / step_dir_name(10) / META).exists()
    assert manager.latest().step == 5  # the previous checkpoint stays the latest
    assert manager.remove_incomplete() == [10]
    assert not (tmp_path / "ckpt" / step_dir_name(10)).exists()
    assert manager.latest().step == 5
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        manager.find(str(tmp_path / "empty"))


def test_fsspec_url_round_trip(info):
    root = "memory://arflow-test/ckpt"
    manager = CheckpointManager(root, info, keep_last=1)
    manager.save(1, writer("one"), {"world_size": 1})
    manager.save(2, writer("two"), {"world_size": 1})
    fs = fsspec.filesystem("memory")
    assert manager.complete_steps() == [2]
    assert json.loads(fs.cat(f"/arflow-test/ckpt/{step_dir_name(2)}/{META}"))["step"] == 2
    found = manager.latest()
    assert found.url.startswith("memory://")
    path, shared, cleanup = fetch(found)
    try:
        assert not shared
        assert Path(path, "payload.txt").read_text() == "two"
    finally:
        cleanup()
    assert not os.path.exists(path)
