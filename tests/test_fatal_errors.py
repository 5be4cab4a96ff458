"""A fatal error ends every process of the job promptly and loudly, under every launcher, with
data-loader workers (a failure with workers used to leave the trainer hanging at exit for good).

Faults inside the loader workers, mid-stream: shards whose bytes stop matching the manifest's
checksum, and shards deleted after the first training steps; a shard missing from the start; a
non-finite loss; a rank that fails while the other waits in a collective; SIGTERM during start-up.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_distributed import ROOT, command, env, losses, tiny_config

pytestmark = pytest.mark.slow

DEADLINE = 60  # seconds from the fault to the end of every process of the job
SHARD = re.compile(r"shard \S*/shards/c\d+_\d+\.tar")


def shards_copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def corrupt_all(data: Path) -> None:
    """Flip the last byte (tar padding) of every shard: each still reads sample by sample, but
    no longer hashes to the manifest's checksum, found once a worker has read it to the end."""
    for tar in (data / "shards").glob("*.tar"):
        raw = bytearray(tar.read_bytes())
        raw[-1] ^= 0xFF
        tar.write_bytes(bytes(raw))


def delete_all(data: Path) -> None:
    for tar in (data / "shards").glob("*.tar"):
        tar.unlink()


def data_config(tmp: Path, backend: str, data: Path, workers: int, **sections) -> Path:
    return tiny_config(
        tmp,
        backend,
        model={"in_channels": 3, "num_classes": 10},
        data={"url": str(data), "num_workers": workers, **sections.pop("data", {})},
        train={"steps": 100_000, **sections.pop("train", {})},
        **sections,
    )


def run_to_failure(cmd: list[str], run_dir: Path, fault=None) -> tuple[int, str, float]:
    """Start the job; with `fault`, apply it once step 1 is logged. Returns the job's exit status,
    its output and the seconds from the fault (else the start) until every process of the job
    (launcher, ranks, loader workers) is gone -- orphans included: torchrun starts its ranks in
    sessions of their own, so they are tracked by pid while the job runs."""
    log = run_dir.parent / "output.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)
    job = Job(proc)
    start = time.monotonic()
    try:
        if fault is not None:
            while not (run_dir / "metrics.jsonl").exists() or not losses(run_dir):
                assert proc.poll() is None, f"ended before step 1:\n{log.read_text()[-4000:]}"
                assert time.monotonic() - start < 300, "no training step within 300 s"
                job.track()
                time.sleep(0.05)
            job.track()
            fault()
            start = time.monotonic()
        while job.alive():
            if time.monotonic() - start > DEADLINE:
                pytest.fail(
                    f"{job.alive()} still running {DEADLINE} s after the fault:\n"
                    f"{log.read_text()[-4000:]}"
                )
            job.track()
            time.sleep(0.05)
        seconds = time.monotonic() - start
        return proc.wait(), log.read_text(), seconds
    finally:
        job.kill()


class Job:
    """The launcher and every process it started, followed by pid (and start time, which
    psutil checks, so a reused pid is not mistaken for one of them)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.processes = {proc.pid: psutil.Process(proc.pid)}

    def track(self) -> None:
        try:
            for child in self.processes[self.proc.pid].children(recursive=True):
                self.processes.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def alive(self) -> list[str]:
        self.proc.poll()  # reap the launcher
        running = []
        for p in self.processes.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    running.append(f"pid {p.pid} ({' '.join(p.cmdline()[-3:])})")
            except psutil.NoSuchProcess:
                pass
        return running

    def kill(self) -> None:
        for p in self.processes.values():
            try:
                if p.is_running():
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()


FAULTS = {"corrupt": corrupt_all, "delete": delete_all}
CASES = [
    # launcher, ranks, workers, backend, fault applied once step 1 is logged: "corrupt" (the
    # checksum fails when a worker has read a shard to its end), "delete" (a worker opening its
    # next shard finds it missing)
    pytest.param("python", 1, 1, "ddp", "corrupt", id="python-1rank-1worker-corrupt"),
    pytest.param("python", 1, 2, "ddp", "delete", id="python-1rank-2workers-delete"),
    pytest.param("torchrun", 2, 1, "ddp", "delete", id="torchrun-2ranks-1worker-delete"),
    pytest.param("deepspeed", 2, 2, "deepspeed", "corrupt", id="deepspeed-2ranks-2workers-corrupt"),
]


@pytest.mark.parametrize("launcher,ranks,workers,backend,fault", CASES)
def test_shard_fault_in_a_worker_ends_the_job(
    tmp_path, digits_shards, launcher, ranks, workers, backend, fault
):
    data = shards_copy(digits_shards, tmp_path / "data")
    cfg = data_config(tmp_path, backend, data, workers)
    status, out, seconds = run_to_failure(
        command(launcher, ranks, cfg), tmp_path / "run", fault=lambda: FAULTS[fault](data)
    )
    print(
        f"{launcher} {ranks} rank(s) {workers} worker(s) {fault}: exit {status} in {seconds:.1f} s"
    )
    assert status != 0, out[-4000:]
    assert SHARD.search(out), out[-4000:]  # names the shard
    if fault == "corrupt":
        assert "checksum mismatch" in out
    assert "failed: " in out  # the one-line summary of the failing rank
    assert seconds < DEADLINE


def test_shard_missing_at_start(tmp_path, digits_shards):
    data = shards_copy(digits_shards, tmp_path / "data")
    missing = sorted((data / "shards").glob("*.tar"))[7]
    missing.unlink()
    cfg = data_config(tmp_path, "ddp", data, workers=2)
    status, out, seconds = run_to_failure(command("torchrun", 2, cfg), tmp_path / "run")
    print(f"torchrun 2 ranks, shard missing at start: exit {status} in {seconds:.1f} s")
    assert status != 0 and missing.name in out, out[-4000:]


def test_nonfinite_stop_with_workers(tmp_path, digits_shards):
    """An absurd learning rate makes every step non-finite after the first: the run stops after
    train.max_nonfinite_steps of them and exits at once, workers and all."""
    cfg = data_config(
        tmp_path,
        "ddp",
        Path(digits_shards),
        workers=2,
        train={"max_nonfinite_steps": 3},
        optim={"lr": 1e30, "warmup_steps": 0, "schedule": "constant"},
    )
    status, out, seconds = run_to_failure(command("python", 1, cfg), tmp_path / "run")
    print(f"python 1 rank 2 workers, non-finite stop: exit {status} in {seconds:.1f} s")
    assert status != 0
    assert "3 consecutive non-finite steps" in out, out[-4000:]


FAILING_PEER = """
import os, sys, time
import torch.distributed as dist
from arflow.distributed.env import init_distributed
from arflow.distributed import failure
failure.TEARDOWN_S = 3.0
info = init_distributed("cpu")
watch = failure.FailureWatch(info).start()
if info.rank == 1:
    watch.report(RuntimeError("boom on rank 1"))
    time.sleep(600)  # a teardown that hangs (e.g. a process group that cannot be destroyed)
else:
    dist.barrier()  # rank 1 never comes: without the watch this waits for the group's timeout
print("rank", info.rank, "got past its wait", flush=True)
"""


# After a node joins an elastic job, its ranks carry different TORCHELASTIC_RESTART_COUNTs (each
# torchrun agent counts its own restarts, a membership change counts none, a new agent starts at
# 0): the report must still reach every rank.
@pytest.mark.parametrize("restart_counts", [{}, {0: "1", 1: "0"}], ids=["plain", "elastic"])
def test_failing_rank_stops_the_rank_waiting_in_a_collective(tmp_path, restart_counts):
    from arflow.distributed.env import free_port

    port = str(free_port())
    procs = []
    start = time.monotonic()
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.txt", "w") as log:
            rank_env = dict(
                env(),
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
            if restart_counts:
                rank_env["TORCHELASTIC_RESTART_COUNT"] = restart_counts[rank]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", FAILING_PEER],
                    cwd=ROOT,
                    env=rank_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        status0 = procs[0].wait(timeout=60)
        seconds0 = time.monotonic() - start
        status1 = procs[1].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out0, out1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    print(f"waiting rank stopped after {seconds0:.1f} s")
    assert status0 == 1 and "rank 0 stops because rank 1 failed: RuntimeError: boom" in out0, out0
    assert "got past" not in out0
    assert status1 == 1 and "still running 3 s after the error" in out1, out1


def test_sigterm_during_startup_exits_with_a_message(tmp_path):
    """Rank 0 of two waits in the rendezvous for a rank 1 that never comes (the main thread is
    inside C++ code); SIGTERM there ends it at once, saying so."""
    from arflow.distributed.env import free_port

    port = free_port()
    cfg = tiny_config(tmp_path, "ddp")
    proc = subprocess.Popen(
        command("python", 1, cfg),
        cwd=ROOT,
        env=dict(
            env(),
            RANK="0",
            WORLD_SIZE="2",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _listening(port):  # rank 0's rendezvous store is up: it waits for rank 1
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=30)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"SIGTERM during start-up: exit {proc.returncode} after {seconds:.2f} s")
    assert proc.returncode == 128 + signal.SIGTERM
    assert "rank 0: SIGTERM received during start-up" in out, out[-3000:]
    assert seconds < 10


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
