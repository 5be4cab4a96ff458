"""The checkpoint component on one process: atomic commit, discovery, keep_last, clean-up of
interrupted saves, fsspec URLs; checksums with named damage and fallback; run ownership (local
flock, S3 conditional-write lock on a real moto server); lineage-safe retention after a
rollback; the fresh-run refusal; the write probe and a missing bucket."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed as dist

from arflow.checkpoint import (
    HEAD,
    META,
    CheckpointDirInUse,
    CheckpointError,
    CheckpointManager,
    CheckpointRoot,
    fetch,
    find_checkpoint,
    step_dir_name,
)
from arflow.checkpoint.retain import remove_incomplete
from arflow.distributed.env import DistInfo, free_port
from arflow.storage import lock as run_lock
from arflow.storage.lock import RunLockedError
from arflow.utils.metrics import drop_replayed_rows


@pytest.fixture(scope="module")
def info():
    """A one-process gloo group (the manager synchronises ranks with collectives)."""
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dist.destroy_process_group()


def writer(payload: str):
    """A backend's stage_state whose state is one file holding `payload`."""

    def stage(local_dir, copy):
        def write(recorder, group) -> None:
            with recorder.open("payload.txt") as f:
                f.write(payload.encode())

        return write

    return stage


def save(manager: CheckpointManager, step: int, payload: str = "", stage=None) -> str:
    """A save, waited for (committed) before returning."""
    url = manager.save(
        step,
        stage_state=stage or writer(payload or f"s{step}"),
        rank_state={"step": torch.tensor(step)},
        ema=None,
        arch={},
        config={},
    )
    manager.wait()
    return url


def latest(root) -> int | None:
    """The step `--resume auto` would take in `root` (None: a fresh start)."""
    found = CheckpointRoot(str(root)).resume_candidates()
    return found[0].step if found else None


def opened(root, info, keep_last=3, resume=None, overwrite=False, **kw) -> CheckpointManager:
    """A manager as the trainer uses it: directory opened (lock, probe), start resolved."""
    manager = CheckpointManager(str(root), info, keep_last, **kw)
    manager.open()
    try:
        found = manager.resume_target(resume, overwrite)
    except BaseException:
        manager.close()
        raise
    if found is not None:
        found.release()
    return manager


def test_commit_latest_and_keep_last(tmp_path, info):
    manager = opened(tmp_path / "ckpt", info, keep_last=2)
    assert latest(tmp_path / "ckpt") is None
    for step in (10, 20, 30):
        save(manager, step)
    assert manager.root.complete_steps() == [20, 30]
    newest = find_checkpoint(str(tmp_path / "ckpt"))
    assert newest.step == 30 and newest.meta["world_size"] == 1
    assert (tmp_path / "ckpt" / step_dir_name(30) / "payload.txt").read_text() == "s30"
    # A root or a step directory both resolve.
    assert find_checkpoint(str(tmp_path / "ckpt")).step == 30
    assert find_checkpoint(str(tmp_path / "ckpt" / step_dir_name(20))).step == 20
    manager.close()


def test_interrupted_save_is_ignored_then_removed(tmp_path, info):
    manager = opened(tmp_path / "ckpt", info)
    save(manager, 5, "good")

    def crash(local_dir, copy):
        def write(recorder, group) -> None:
            writer("partial")(local_dir, copy)(recorder, group)
            raise KeyboardInterrupt  # the process dies after writing some files, before the commit

        return write

    with pytest.raises(KeyboardInterrupt):
        save(manager, 10, stage=crash)
    assert (tmp_path / "ckpt" / step_dir_name(10) / "payload.txt").exists()
    assert not (tmp_path / "ckpt" / step_dir_name(10) / META).exists()
    assert latest(tmp_path / "ckpt") == 5  # the previous checkpoint stays the latest
    assert remove_incomplete(manager.root) == [10]
    assert not (tmp_path / "ckpt" / step_dir_name(10)).exists()
    assert latest(tmp_path / "ckpt") == 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(str(tmp_path / "empty"))
    manager.close()


def test_fsspec_url_round_trip(info):
    root = "memory://arflow-test/ckpt"
    manager = opened(root, info, keep_last=1)
    save(manager, 1, "one")
    save(manager, 2, "two")
    fs = fsspec.filesystem("memory")
    assert manager.root.complete_steps() == [2]
    assert json.loads(fs.cat(f"/arflow-test/ckpt/{step_dir_name(2)}/{META}"))["step"] == 2
    found = find_checkpoint(root)
    assert found.url.startswith("memory://")
    fetch(found)
    try:
        assert not found.shared
        assert Path(found.local, "payload.txt").read_text() == "two"
        local = found.local
    finally:
        found.release()
    assert not os.path.exists(local)
    manager.close()


# ------------------------------------------------------------------------------ integrity
def test_meta_records_size_and_checksum_of_every_file(tmp_path, info):
    import hashlib

    manager = opened(tmp_path, info)
    save(manager, 1, "payload")
    step = tmp_path / step_dir_name(1)
    files = json.loads((step / META).read_text())["files"]
    on_disk = sorted(
        str(p.relative_to(step)) for p in step.rglob("*") if p.is_file() and p.name != META
    )
    assert sorted(files) == on_disk == ["payload.txt", "trainer/rank_00000.pt"]
    for rel, record in files.items():
        data = (step / rel).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manager.close()


def test_recorder_hashes_large_writes_concurrently_and_correctly(tmp_path):
    import hashlib

    from arflow.storage.hashing import PARALLEL, FileRecorder

    chunks = [os.urandom(3 * PARALLEL), os.urandom(100), os.urandom(PARALLEL + 7)]
    recorder = FileRecorder(str(tmp_path))
    with recorder.open("big/file.bin") as f:
        for chunk in chunks:
            f.write(chunk)
    data = b"".join(chunks)
    assert (tmp_path / "big" / "file.bin").read_bytes() == data
    assert recorder.records == {
        "big/file.bin": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    }


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_is_named_and_auto_falls_back(tmp_path, info, damage, capsys):
    manager = opened(tmp_path, info, keep_last=5)
    save(manager, 1, "x" * 1000)
    save(manager, 2, "y" * 1000)
    manager.close()
    victim = tmp_path / step_dir_name(2) / "payload.txt"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[500] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:10]))
    else:
        victim.unlink()

    resumed = CheckpointManager(str(tmp_path), info, 5)
    resumed.open()
    found = resumed.resume_target("auto", overwrite=False)
    out = capsys.readouterr().out
    assert found.step == 1  # the newest older intact checkpoint
    reason = {
        "flip": "checksum mismatch",
        "truncate": "10 bytes, expected 1000",
        "delete": "missing",
    }
    assert f"{step_dir_name(2)} (step 2) is damaged: payload.txt: {reason[damage]}" in out
    assert "CHECKPOINT DAMAGED, NOT USED" in out
    found.release()
    resumed.close()

    # Named explicitly, a damaged step directory is refused, not silently replaced.
    explicit = CheckpointManager(str(tmp_path), info, 5)
    explicit.open()
    with pytest.raises(CheckpointError, match=r"step 2\) is damaged: payload.txt"):
        explicit.resume_target(str(tmp_path / step_dir_name(2)), overwrite=False)
    explicit.close()


def test_corrupt_meta_json_is_named(tmp_path, info, capsys):
    manager = opened(tmp_path, info)
    save(manager, 1)
    save(manager, 2)
    manager.close()
    (tmp_path / step_dir_name(2) / META).write_text('{"step": 2, "fil')
    resumed = CheckpointManager(str(tmp_path), info, 3)
    resumed.open()
    assert resumed.resume_target("auto", overwrite=False).step == 1
    assert f"{step_dir_name(2)}/{META} is corrupt (not JSON" in capsys.readouterr().out
    resumed.close()
    with pytest.raises(CheckpointError, match=f"{step_dir_name(2)}/{META} is corrupt"):
        find_checkpoint(str(tmp_path / step_dir_name(2)))


def test_drop_replayed_rows_keeps_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    drop_replayed_rows(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in superseded] == [4, 5]


# ------------------------------------------------------------------------------ ownership
def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, info, capsys):
    first = opened(tmp_path, info)
    save(first, 25)
    save(first, 30)
    first.close()
    with pytest.raises(CheckpointDirInUse, match=r"holds complete checkpoints \(steps 25, 30\)"):
        opened(tmp_path, info)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [step_dir_name(25), step_dir_name(30)]
    overwrite = opened(tmp_path, info, overwrite=True)
    assert "--overwrite: deleted checkpoints [25, 30]" in capsys.readouterr().out
    assert overwrite.root.complete_steps() == []
    overwrite.close()


def test_second_run_on_a_locked_directory_is_refused(tmp_path, info):
    first = opened(tmp_path / "ckpt", info)
    with pytest.raises(RunLockedError, match=f"in use by run {first.run_id} \\(pid {os.getpid()}"):
        CheckpointManager(str(tmp_path / "ckpt"), info, 3).open()
    first.close()
    # A lock file left by a process that died holds no flock: the next run takes it.
    again = CheckpointManager(str(tmp_path / "ckpt"), info, 3)
    again.open()
    again.close()


def test_run_dir_and_checkpoint_dir_are_both_locked(tmp_path, info):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "shared-ckpt"
    first = CheckpointManager(str(elsewhere), info, 3)
    first.open(run_dir=str(run_dir))
    assert (run_dir / run_lock.LOCK_NAME).exists() and (elsewhere / run_lock.LOCK_NAME).exists()
    with pytest.raises(RunLockedError, match="shared-ckpt is in use"):
        CheckpointManager(str(elsewhere), info, 3).open(run_dir=str(tmp_path / "other-run"))
    with pytest.raises(RunLockedError, match="run is in use"):
        CheckpointManager(str(tmp_path / "c2"), info, 3).open(run_dir=str(run_dir))
    first.close()


@pytest.mark.slow  # a moto S3 server
def test_s3_lock_is_exclusive_goes_stale_and_detects_takeover(moto_s3, info, monkeypatch):
    url = f"s3://{moto_s3.bucket()}/run/ckpt"
    options = moto_s3.storage_options
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.2)
    first = CheckpointManager(url, info, 3, storage_options=options)
    first.open()
    with pytest.raises(RunLockedError, match=f"in use by run {first.run_id}"):
        CheckpointManager(url, info, 3, storage_options=options).open()
    # The first run stalls (no heartbeat) past the staleness limit: a new run takes over.
    first._locks[0]._stop.set()
    first._locks[0]._thread.join()
    monkeypatch.setattr(run_lock, "STALE_AFTER_S", 0.0)
    second = CheckpointManager(url, info, 3, storage_options=options)
    second.open()
    first._locks[0].beat()
    assert first._locks[0].lost
    with pytest.raises(RuntimeError, match="taken over by another run"):
        save(first, 1)
    fs = fsspec.filesystem("s3", **options)
    assert not fs.exists(f"{url}/{step_dir_name(1)}")
    first.close()
    assert fs.exists(f"{url}/{run_lock.LOCK_NAME}")  # the loser does not delete the winner's
    second.close()
    fs.invalidate_cache()
    assert not fs.exists(f"{url}/{run_lock.LOCK_NAME}")


# -------------------------------------------------------------------- probe and buckets
@pytest.mark.slow  # a moto S3 server
def test_missing_bucket_is_an_error_and_never_created(moto_s3, info):
    url = "s3://no-such-bucket-arflow/ckpt"
    manager = CheckpointManager(url, info, 3, storage_options=moto_s3.storage_options)
    with pytest.raises(OSError, match="bucket 'no-such-bucket-arflow' .* does not exist"):
        manager.open()
    fs = fsspec.filesystem("s3", **moto_s3.storage_options)
    fs.invalidate_cache()
    assert not fs.exists("no-such-bucket-arflow")


def test_unwritable_checkpoint_dir_fails_at_open_naming_it(tmp_path, info):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    manager = CheckpointManager(str(blocker / "ckpt"), info, 3)
    with pytest.raises(OSError, match=f"{blocker}/ckpt is not writable"):
        manager.open()


@contextlib.contextmanager
def without_root():
    """Run the body with permission checks: as root (CI, containers), under the effective uid
    of `nobody` (the real uid stays root, so it can be taken back); otherwise as is."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_read_only_checkpoint_dir_fails_at_open_naming_it(info):
    # Not under tmp_path: pytest's base directory is private to its owner, and the body may run
    # as `nobody`, who must reach the directory to be refused by the directory itself.
    with tempfile.TemporaryDirectory() as parent:
        os.chmod(parent, 0o755)
        root = Path(parent) / "ckpt"
        root.mkdir(mode=0o555)
        with without_root(), pytest.raises(OSError, match=f"{root}.*Permission denied"):
            CheckpointManager(str(root), info, 3).open()


@pytest.mark.slow  # a moto S3 server
def test_s3_checkpoints_round_trip_with_checksums(moto_s3, info):
    url = f"s3://{moto_s3.bucket()}/ckpt"
    manager = opened(url, info, keep_last=2, storage_options=moto_s3.storage_options)
    for step in (1, 2, 3):
        save(manager, step)
    assert manager.root.complete_steps() == [2, 3]
    manager.close()
    resumed = CheckpointManager(url, info, 2, storage_options=moto_s3.storage_options)
    resumed.open()
    found = resumed.resume_target("auto", overwrite=False)
    assert found.step == 3 and not found.shared
    assert Path(found.local, "payload.txt").read_text() == "s3"
    assert "payload.txt" in found.meta["files"]
    found.release()
    resumed.close()


# -------------------------------------------------------------------------------- lineage
def test_rollback_keeps_its_lineage_and_protects_the_abandoned_one(tmp_path, info, capsys):
    a = opened(tmp_path, info, keep_last=2)
    for step in (10, 20, 30):
        save(a, step)
    a.close()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [step_dir_name(s) for s in (20, 30)]

    # Roll back to step 20 while step 30 exists.
    b = opened(tmp_path, info, keep_last=1, resume=str(tmp_path / step_dir_name(20)))
    head = json.loads((tmp_path / HEAD).read_text())
    assert head["run"] == b.run_id and head["from"] == str(tmp_path / step_dir_name(20))
    # Before the new branch saves anything, `--resume auto` continues it: step 20, not 30.
    assert latest(tmp_path) == 20
    save(b, 25)
    save(b, 27)  # keep_last=1 prunes b's 25, never the start (20) nor a's 30
    steps = sorted(p.name for p in tmp_path.glob("step_*"))
    assert steps == [step_dir_name(s) for s in (20, 27, 30)]
    assert latest(tmp_path) == 27
    save(b, 30)  # the same step as the abandoned branch: that one is moved aside, not deleted
    a_run = a.run_id
    assert (tmp_path / f"{step_dir_name(30)}.abandoned-{a_run}" / "payload.txt").exists()
    assert f"step 30 of another lineage (run {a_run}) moved to" in capsys.readouterr().out
    assert json.loads((tmp_path / step_dir_name(30) / META).read_text())["run_id"] == b.run_id
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        step_dir_name(20),
        step_dir_name(30),
        f"{step_dir_name(30)}.abandoned-{a_run}",
    ]
    b.close()

    # The next run continues b's branch; its lineage reaches back through a (until step 20).
    c = opened(tmp_path, info, keep_last=1, resume="auto")
    assert c.start.step == 30 and c.start.run_id == b.run_id
    assert [e["run"] for e in c.lineage] == [a_run, b.run_id, c.run_id]
    assert c.lineage[0]["until"] == 20 and c.lineage[1]["until"] == 30
    c.close()


# ------------------------------------------------- the trainer under faults (real launcher)
def launch(config, *args, timeout=300, expect_ok=True, **popen):
    import subprocess

    from test_distributed import ROOT, command, env

    proc = subprocess.run(
        command("python", 1, config, *args),
        cwd=ROOT,
        env=env() | popen.pop("env", {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_ok, f"exit {proc.returncode}:\n{out[-5000:]}"
    return out


def metric_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


class OsSystem:
    """A pickle that runs a shell command when loaded: it must never be."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def reseal(step_dir: Path, rel: str) -> None:
    """Record a replaced file's size and checksum in meta.json, as an attacker who can write
    the bucket would: the checksums then pass, the unpickling must refuse it."""
    import hashlib

    meta = json.loads((step_dir / META).read_text())
    data = (step_dir / rel).read_bytes()
    meta["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / META).write_text(json.dumps(meta))


@pytest.mark.slow
def test_trainer_refuses_reuse_falls_back_from_damage_and_never_unpickles_code(tmp_path):
    from test_distributed import tiny_config

    cfg = tiny_config(tmp_path, "ddp", train={"steps": 6}, checkpoint={"every": 2, "keep_last": 5})
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    launch(cfg)
    exported = (run_dir / "ema.safetensors").read_bytes()

    # A fresh run in the same directory is refused; nothing is deleted or overwritten.
    out = launch(cfg, "--set", "train.steps=8", expect_ok=False)
    assert "already holds complete checkpoints (steps 2, 4, 6)" in out and "--resume auto" in out
    assert sorted(p.name for p in ckpt.glob("step_*")) == [step_dir_name(s) for s in (2, 4, 6)]
    assert (run_dir / "ema.safetensors").read_bytes() == exported

    # Random bytes inside step 6's EMA: named, loudly skipped, resumed from step 4. Steps 5-6
    # are trained again and logged once (the first run's rows move aside).
    ema = ckpt / step_dir_name(6) / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-100:-50] = os.urandom(50)
    ema.write_bytes(bytes(data))
    out = launch(cfg, "--resume", "auto", "--set", "train.steps=8")
    assert "CHECKPOINT DAMAGED, NOT USED" in out
    assert f"{step_dir_name(6)} (step 6) is damaged: ema.safetensors: checksum mismatch" in out
    assert f"resumed from {ckpt / step_dir_name(4)} at step 4" in out
    assert metric_steps(run_dir) == list(range(1, 9))
    superseded = (run_dir / "metrics.superseded.jsonl").read_text().splitlines()
    assert sorted({json.loads(line)["step"] for line in superseded}) == [5, 6]
    # The damaged step 6 belonged to the abandoned branch: moved aside, not deleted.
    assert len(list(ckpt.glob(f"{step_dir_name(6)}.abandoned-*"))) == 1

    # A rank file replaced by a pickle that runs a command, checksums updated to match: the
    # resume refuses it and the command never runs.
    marker = tmp_path / "pwned"
    step8 = ckpt / step_dir_name(8)
    torch.save({"rng": OsSystem(f"touch {marker}")}, step8 / "trainer" / "rank_00000.pt")
    reseal(step8, "trainer/rank_00000.pt")
    out = launch(cfg, "--resume", "auto", "--set", "train.steps=10", expect_ok=False)
    assert "rank_00000.pt: it needs arbitrary code to unpickle" in out
    assert "never executed" in out and not marker.exists()

    # DeepSpeed-free DCP metadata with a payload is refused the same way.
    dcp_meta = ckpt / step_dir_name(8) / ".metadata"
    import pickle

    dcp_meta.write_bytes(pickle.dumps(OsSystem(f"touch {marker}")))
    reseal(step8, ".metadata")
    torch.save({"ok": torch.zeros(1)}, step8 / "trainer" / "rank_00000.pt")
    reseal(step8, "trainer/rank_00000.pt")
    out = launch(cfg, "--resume", "auto", "--set", "train.steps=10", expect_ok=False)
    assert "its pickle asks for posix.system" in out and not marker.exists()


@pytest.mark.slow
def test_second_trainer_on_a_running_directory_is_refused(tmp_path):
    import subprocess
    import time

    from test_distributed import ROOT, command, env, losses, tiny_config

    cfg = tiny_config(tmp_path, "ddp", train={"steps": 400}, checkpoint={"every": 1000})
    first = subprocess.Popen(
        command("python", 1, cfg),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "run" / "metrics.jsonl").exists() and losses(tmp_path / "run")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        out = launch(cfg, "--resume", "auto", expect_ok=False, timeout=120)
        assert f"{tmp_path / 'run'} is in use by run" in out and f"pid {first.pid}" in out
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_checkpoint_dir_is_probed_before_training(tmp_path, moto_s3):
    from test_distributed import tiny_config

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = tiny_config(tmp_path / "a", "ddp", checkpoint={"dir": str(blocker / "ckpt")})
    out = launch(cfg, expect_ok=False, timeout=120)
    assert f"checkpoint.dir {blocker / 'ckpt'} is not writable" in out
    assert not (tmp_path / "a" / "run" / "metrics.jsonl").exists()  # not a single step

    options = moto_s3.storage_options
    cfg = tiny_config(
        tmp_path / "b",
        "ddp",
        checkpoint={"dir": "s3://missing-arflow-bucket/ckpt", "storage_options": options},
    )
    out = launch(cfg, expect_ok=False, timeout=120)
    assert "bucket 'missing-arflow-bucket'" in out and "never creates buckets" in out
    fs = fsspec.filesystem("s3", **options)
    assert not fs.exists("missing-arflow-bucket")


def test_a_failed_background_write_reports_its_own_error(tmp_path, info):
    """A backend write that fails with something other than a file error (a collective whose
    peer is gone, as when a node dies in the middle of a save) is reported as that error, through
    the ranks' error exchange, and nothing is committed."""

    def stage(local_dir, copy):
        def write(recorder, group) -> None:
            raise RuntimeError("Connection closed by peer [127.0.0.1]:4242")

        return write

    manager = opened(tmp_path / "ckpt", info)
    try:
        with pytest.raises(OSError, match=r"saving step 5 .* failed: RuntimeError: Connection"):
            save(manager, 5, stage=stage)
        assert manager.root.complete_steps() == []
    finally:
        manager.close()


@pytest.mark.slow
def test_disk_full_during_a_save_names_the_file(tmp_path):
    """RLIMIT_FSIZE makes writes past 200 KB fail as a full disk would (EFBIG, no path of its
    own): the error names the file, the step directory stays uncommitted."""
    import resource
    import signal

    from test_distributed import tiny_config

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    cfg = tiny_config(tmp_path, "ddp", train={"steps": 4}, checkpoint={"every": 2})
    out = launch(cfg, expect_ok=False, preexec_fn=limit)
    assert "saving step 2 to" in out and "File too large (writing " in out
    assert not (tmp_path / "run" / "checkpoints" / step_dir_name(2) / META).exists()


@pytest.mark.slow
def test_trainer_checkpoints_on_s3_and_resumes_from_them(tmp_path, moto_s3):
    from test_distributed import tiny_config

    url = f"s3://{moto_s3.bucket()}/run/ckpt"
    options = moto_s3.storage_options
    cfg = tiny_config(
        tmp_path,
        "ddp",
        train={"steps": 4},
        checkpoint={"dir": url, "storage_options": options, "every": 2, "keep_last": 1},
    )
    launch(cfg)
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    # keep_last=1 kept step 4; the lock went with the end of the run.
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url)) == [HEAD, step_dir_name(4)]
    out = launch(cfg, "--resume", "auto", "--set", "train.steps=6")
    assert f"resumed from {url}/{step_dir_name(4)} at step 4" in out
    assert metric_steps(tmp_path / "run") == list(range(1, 7))


def damage_object(fs, url: str) -> None:
    """Flip one byte of an S3 object in place (a bad upload, a bit rot)."""
    data = bytearray(fs.cat_file(url))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(url, bytes(data))


@pytest.mark.slow
def test_s3_falls_back_from_damage_and_continues_past_it_twice_then_rolls_back(tmp_path, moto_s3):
    """On S3: the newest checkpoint damaged, `--resume auto` falls back to the one before,
    trains past the damaged step's number (moving the damaged one aside, object by object) and
    saves; the same again one round later; then a rollback to an older step that reaches steps
    saved by the branch it abandons. Every start resumes where it should, nothing crash-loops."""
    from test_distributed import tiny_config

    url = f"s3://{moto_s3.bucket()}/run/ckpt"
    options = moto_s3.storage_options
    fs = fsspec.filesystem("s3", **options)
    cfg = tiny_config(
        tmp_path,
        "ddp",
        train={"steps": 4},
        checkpoint={"dir": url, "storage_options": options, "every": 2, "keep_last": 10},
    )
    launch(cfg)

    def listing() -> list[str]:
        fs.invalidate_cache()
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url))

    for newest in (4, 6):  # two rounds: damage the newest, fall back, continue past it
        damage_object(fs, f"{url}/{step_dir_name(newest)}/ema.safetensors")
        out = launch(cfg, "--resume", "auto", "--set", f"train.steps={newest + 2}")
        assert "CHECKPOINT DAMAGED, NOT USED" in out and f"{step_dir_name(newest)}" in out
        assert f"resumed from {url}/{step_dir_name(newest - 2)} at step {newest - 2}" in out
        assert f"step {newest} of another lineage" in out
        aside = [n for n in listing() if n.startswith(f"{step_dir_name(newest)}.abandoned-")]
        assert len(aside) == 1  # moved aside whole, not lost
        assert fs.exists(f"{url}/{aside[0]}/{META}")
        assert metric_steps(tmp_path / "run")[-2:] == [newest + 1, newest + 2]

    out = launch(cfg, "--resume", "auto", "--set", "train.steps=10")
    assert f"resumed from {url}/{step_dir_name(8)} at step 8" in out

    # A rollback to step 4 (of the second branch) while steps 6-10 exist: it reaches 6 and 8,
    # moves those aside, and the next `--resume auto` stays on the rollback's branch.
    out = launch(cfg, "--resume", f"{url}/{step_dir_name(4)}", "--set", "train.steps=8")
    assert f"resumed from {url}/{step_dir_name(4)} at step 4" in out
    assert "step 6 of another lineage" in out and "step 8 of another lineage" in out
    out = launch(cfg, "--resume", "auto", "--set", "train.steps=9")
    assert f"resumed from {url}/{step_dir_name(8)} at step 8" in out
    assert step_dir_name(10) in listing()  # the abandoned branch's newest stays untouched


FULL_DISK_SAVE = """
import resource, signal, sys, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # writes past 100 KB fail (EFBIG)
from arflow.checkpoint import CheckpointManager
from arflow.distributed.env import init_distributed

manager = CheckpointManager(sys.argv[1], init_distributed("cpu"), background=sys.argv[2] == "async")
manager.open()
manager.resume_target(None, overwrite=False)
manager.save(
    1,
    stage_state=lambda path, copy: lambda recorder, group: None,
    rank_state={"big": torch.zeros(100_000)},  # torch.save's zip writer hits the limit
    ema=None,
    arch={},
    config={},
)
manager.wait()
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_is_named_with_the_file_not_a_torch_internal(tmp_path, mode):
    """torch.save's zip writer turns a failed write into `[enforce fail at inline_container.cc]
    unexpected pos`; the save reports the write error itself (errno and file), and nothing is
    committed. RLIMIT_FSIZE stands in for a full disk (EFBIG, no path of its own, like ENOSPC)."""
    import subprocess
    import sys

    root = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SAVE, str(root), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    file = root / step_dir_name(1) / "trainer" / "rank_00000.pt"
    assert f"saving step 1 to {root / step_dir_name(1)} failed" in proc.stderr
    assert f"File too large (writing {file})" in proc.stderr
    assert "unexpected pos" not in proc.stderr.splitlines()[-1]
    assert not (root / step_dir_name(1) / META).exists()
