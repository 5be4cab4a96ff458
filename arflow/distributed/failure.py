"""When one rank fails, every rank stops within seconds instead of waiting in a collective.

A rank that raises reports the error in the job's rendezvous store (the TCPStore every launcher
already runs at MASTER_ADDR:MASTER_PORT: the torchrun agent's, or rank 0's under deepspeed, SLURM
and plain python). Every rank runs a thread blocked on its own key in that store; the report sets
them all, and each thread prints which rank failed and why and ends its process with status 1,
whatever its main thread is blocked in (a collective, a barrier, storage). The failing rank prints
the same line, then has `TEARDOWN_S` seconds to finish its own exit (process group, data workers,
wandb, exit handlers) before it is ended too.

A rank killed outright (SIGKILL, the OOM killer, a segfault) reports nothing. Then gloo peers fail
at once on the broken connection; the launchers end the other ranks (torchrun and the deepspeed
launcher terminate them when one exits non-zero, srun with --kill-on-bad-exit); if the store's host
itself is gone the watchers lose the store and stop too; and the collective timeout
(`parallel.collective_timeout_s`) bounds what remains (NCCL peers of a killed rank on other nodes).
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import timedelta

import torch.distributed as dist

from arflow.distributed.env import DistInfo

TEARDOWN_S = 30.0
_FOREVER = timedelta(days=3650)


class FailureWatch:
    """watch = FailureWatch(info).start(); ...; watch.report(error) on failure, watch.stop() at a
    normal end (before the final barrier: rank 0 may host the store and leave right after it)."""

    def __init__(self, info: DistInfo):
        """Collective (every rank of the new process group): the ranks agree on the key
        prefix."""
        self.rank = info.rank
        self.world_size = info.world_size
        self._prefix = f"arflow/failure/{_group_id()}"
        self._address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        # Two connections: the watching thread's blocking wait would hold up the other's writes.
        self._waiter, self._writer = (self._connect() for _ in range(2))
        self._done = False  # stopped, or this rank failed itself: the thread stays silent
        self._thread = threading.Thread(target=self._watch, name="failure-watch", daemon=True)

    def _connect(self) -> dist.TCPStore:
        host, port = self._address.rsplit(":", 1)
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=30))

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    def start(self) -> FailureWatch:
        self._thread.start()
        return self

    def report(self, error: BaseException) -> None:
        """This rank failed with `error`: stop the others, and end this process within
        TEARDOWN_S seconds whatever its teardown does."""
        if self._done:
            return
        self._done = True
        timer = threading.Timer(TEARDOWN_S, self._teardown_expired)
        timer.daemon = True  # must not itself delay the exit
        timer.start()
        reason = f"rank {self.rank} failed: {type(error).__name__}: {_summary(error)[:2000]}"
        _say(f"arflow: {reason}")
        try:
            first = self._writer.compare_set(self._key("reason"), "", reason).decode()
            # Every rank's key, this one's too: its own thread returns now (done), rather than
            # sit in the store's C++ wait until the interpreter's exit, where a daemon thread
            # that wakes up (the store's host gone) is torn down by an abort.
            keys = [self._key(f"wake/{r}") for r in range(self.world_size)]
            self._writer.multi_set(keys, ["failed"] * len(keys))
        except dist.DistError:
            pass  # the store is gone with its host; the others lose it too and stop
        else:
            if first != reason:
                _say(f"arflow: rank {self.rank}: the job had already failed: {first}")
        self._thread.join(timeout=5)

    def stop(self) -> None:
        """A normal end: leave without stopping anyone."""
        if self._done:
            return
        self._done = True
        try:
            self._writer.set(self._key(f"wake/{self.rank}"), "stop")
        except dist.DistError:
            return  # the thread lost the store too and, being done, exits quietly
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        try:
            self._waiter.wait([self._key(f"wake/{self.rank}")], _FOREVER)
            if self._done:
                return
            reason = self._waiter.get(self._key("reason")).decode()
        except dist.DistError as e:
            if self._done:
                return
            reason = (
                f"lost the job's rendezvous store at {self._address} ({type(e).__name__}); its "
                f"host (rank 0, or the launcher's agent) has exited"
            )
        _say(f"arflow: rank {self.rank} stops because {reason}")
        os._exit(1)

    def _teardown_expired(self) -> None:
        _say(f"arflow: rank {self.rank}: still running {TEARDOWN_S:.0f} s after the error; exiting")
        os._exit(1)


def _group_id() -> str:
    """An id that every rank of this process group shares and no earlier group had.

    Elastic restarts can reuse the store (torchrun's agent hosts it for every round), where the
    keys of an earlier round stay. TORCHELASTIC_RESTART_COUNT cannot tell rounds apart: each
    agent counts its own restarts, a membership change counts none and an agent that joined
    later starts at 0, so ranks of one round can hold different counts, and a rank's count can
    equal that of an earlier round whose failure keys are still set."""
    ids = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(ids, src=0)
    return ids[0]


def _summary(error: BaseException) -> str:
    """One line: a DataLoader worker's error carries the worker's whole traceback, whose last
    line is the original message."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} ... {lines[-1].strip()}"
    return lines[0] if lines else ""


def _say(line: str) -> None:
    # os.write, not print: another thread may hold sys.stderr's lock.
    os.write(2, (line + "\n").encode(errors="replace"))
