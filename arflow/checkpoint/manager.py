"""The trainer's checkpoint component: it opens a checkpoint root (write probe, run lock,
clean-up), picks and verifies the checkpoint a run starts from, and saves — by default in the
background — then retains. Backends only hand over their own state (`Backend.stage_state`), and
the EMA through `gather_full` / `shard_full`.

A save, collective, at a step boundary:
1. foreground (training waits): the previous save is waited for; rank 0 makes room for the step
   directory; every rank copies what it saves into host memory (the backend's model and
   optimizer state, its trainer state, rank 0 the EMA): `arflow.distributed.staging`;
2. background (training goes on), one save at a time: every rank writes its files with sizes and
   SHA-256 computed on the way out (fsync'd), uploads them when the root is remote, then rank 0
   writes meta.json — the commit marker — and prunes. The writer's collectives run on a process
   group of their own, off the training path.
A failed background save fails the run at the next step, on every rank; the next save, the end
of the run, a preemption notice and closing the manager all wait for a save in flight.
`checkpoint.async_save: false` runs both parts in the foreground, writing from the live state.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from arflow.checkpoint.layout import (
    HEAD,
    META,
    VERSION,
    CheckpointDirInUse,
    CheckpointError,
    Found,
    rank_file,
    step_dir_name,
)
from arflow.checkpoint.lineage import Head, continued_lineage
from arflow.checkpoint.locate import CheckpointRoot, explicit_candidates
from arflow.checkpoint.retain import make_room, prune, remove_all, remove_incomplete
from arflow.checkpoint.verify import verify
from arflow.config import ConfigError
from arflow.distributed.collectives import all_gather, gather_errors, main_then_share
from arflow.distributed.env import DistInfo
from arflow.distributed.staging import HostStager
from arflow.models.pretrained import EMA_FILE, weights_bytes
from arflow.storage import FileRecorder, RetryPolicy
from arflow.storage.hashing import file_record, list_files
from arflow.storage.lock import LocalLock, directory_lock
from arflow.utils.safe_load import CorruptFileError, load_torch_file

# write(recorder, group): writes a backend's staged state through the checkpoint's recorder,
# using `group` for any collective.
StateWriter = Callable[[FileRecorder, object], None]
# stage_state(local_dir, stage) -> StateWriter: the backend's state, copied by `stage` into host
# memory, or live when it is None (Backend.stage_state).
StageState = Callable[[str, HostStager | None], StateWriter]

LOCK_PURPOSE = (
    "two runs must not share a run or checkpoint directory (each would prune the other's "
    "checkpoints). Stop that run or choose another run.dir / checkpoint.dir."
)


class CheckpointManager:
    def __init__(
        self,
        url: str,
        info: DistInfo,
        keep_last: int = 1,
        storage_options: dict | None = None,
        retry: RetryPolicy = RetryPolicy(),
        background: bool = True,
        precision: str | None = None,
    ):
        self.root = CheckpointRoot(url, storage_options, retry)
        self.store = self.root.store
        self.url = self.store.url
        self.info = info
        self.keep_last = keep_last
        self.background = background
        self.precision = precision  # recorded in meta.json (compat.check_compatible reads it)
        self.run_id = uuid.uuid4().hex[:12]
        self.lineage = [{"run": self.run_id}]
        self.start: Found | None = None
        self._locks = []
        self._group = None
        self._stager = HostStager() if background else None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _report(self, message: str) -> None:
        """A loud message from rank 0."""
        if self.info.is_main:
            bar = "!" * 80
            print(f"{bar}\n{message}\n{bar}", flush=True)

    # --------------------------------------------------------------------- ownership
    def open(self, run_dir: str | None = None) -> list[int]:
        """Collective, before training: check every rank can write the root (a missing bucket
        is an error, never created), take the run lock(s) on rank 0, remove the directories of
        interrupted saves. Returns the steps removed."""
        error = None
        try:
            self._probe()
        except Exception as err:  # reported on every rank, not left waiting below
            error = str(err)
        errors = gather_errors(self.info, error)
        if errors:
            raise OSError(f"checkpoint.dir {self.url} is not writable: " + "; ".join(errors))
        if self.background:  # the background writer's collectives stay off the training group
            self._group = dist.new_group(backend="gloo")

        def lock_and_clean():
            locks = [LocalLock(run_dir, self.run_id, purpose=LOCK_PURPOSE)] if run_dir else []
            if not (run_dir and self.store.local and _inside(self.store.root, run_dir)):
                locks.append(
                    directory_lock(
                        self.url,
                        self.run_id,
                        self.store.storage_options,
                        self.store.retry,
                        purpose=LOCK_PURPOSE,
                    )
                )
            try:
                for lock in locks:
                    lock.acquire()
                    self._locks.append(lock)
            except BaseException:
                self.close()
                raise
            atexit.register(self.close)  # also when start-up fails after this point
            return remove_incomplete(self.root)

        return main_then_share(self.info, lock_and_clean)

    def _probe(self) -> None:
        """Write, read back and delete a small file in the root."""
        name = f".write-probe-{uuid.uuid4().hex[:8]}"
        store = self.store
        if not store.local:
            bucket = store.root.split("/", 1)[0]
            if hasattr(store.fs, "split_path") and not store.fs.exists(bucket):  # s3fs, gcsfs
                raise OSError(
                    f"bucket {bucket!r} of checkpoint.dir {self.url} does not exist (or is not "
                    f"visible with these credentials); create it first: arflow never creates "
                    f"buckets"
                )
        try:
            if store.local:
                os.makedirs(store.root, exist_ok=True)
            store.write_atomic(name, b"arflow")
            if store.read(name) != b"arflow":
                raise OSError(f"{store.url_of(name)} read back differently")
        except OSError as err:
            raise OSError(f"cannot write under {self.url}: {err}") from None
        finally:
            with contextlib.suppress(Exception):  # a failed probe's own error is the one to report
                store.remove(name)

    def check_owned(self) -> None:
        """Raise if another run took the lock over (the object-store lock's heartbeat lost)."""
        lost = any(getattr(lock, "lost", False) for lock in self._locks)
        if main_then_share(self.info, lambda: lost):
            raise RuntimeError(
                f"the run lock on {self.url} was taken over by another run; this run stops "
                f"without writing or deleting anything more there"
            )

    def close(self) -> None:
        """Wait for a save in flight (its failure is printed, not raised: a failing run is
        already on its way out), then release the locks."""
        try:
            self.wait()
        except Exception:
            traceback.print_exc()
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []

    # -------------------------------------------------------------------------- resume
    def resume_target(self, resume: str | None, overwrite: bool) -> Found | None:
        """Collective: the verified checkpoint to start from (fetched: `found.local` is
        readable on this rank), or None for a fresh start. Records the run's lineage and, on
        rank 0, HEAD.json. `resume`: None, "auto", or a step directory / checkpoint root."""
        if resume and overwrite:
            raise ConfigError(
                "--overwrite starts afresh and --resume continues a checkpoint: give one of them"
            )

        def choose() -> list[Found]:
            if resume == "auto":
                return self.root.resume_candidates(self._report)
            if resume is not None:
                return explicit_candidates(resume, self.store.storage_options, self.store.retry)
            existing = self.root.complete_steps()
            if existing and not overwrite:
                raise CheckpointDirInUse(
                    f"checkpoint.dir {self.url} already holds complete checkpoints (steps "
                    f"{', '.join(map(str, existing))}). Pass --resume auto to continue them, "
                    f"--resume PATH to start from one, or --overwrite to delete them and start "
                    f"afresh (or choose another checkpoint.dir)."
                )
            if overwrite:
                deleted = remove_all(self.root)
                if deleted:
                    self._report(f"--overwrite: deleted checkpoints {deleted} in {self.url}")
            return []

        candidates = main_then_share(self.info, choose)
        found = self._first_intact(candidates, explicit=resume not in (None, "auto"))
        self.start = found
        self.lineage = continued_lineage(found, self.run_id)
        head = Head(self.run_id, self.lineage, found.url if found else None)
        main_then_share(self.info, lambda: self.store.write_atomic(HEAD, head.to_json(time.time())))
        return found

    def _first_intact(self, candidates: list[Found], explicit: bool) -> Found | None:
        """Fetch and verify the candidates in order; the first intact one. Damage is reported
        loudly (file and step); an explicitly named step directory is never replaced."""
        problems_seen = []
        for found in candidates:
            problems = verify(found, self.info)
            if not problems:
                return found
            found.release()
            message = (
                f"checkpoint {found.url} (step {found.step}) is damaged: {'; '.join(problems)}"
            )
            problems_seen.append(message)
            if explicit and len(candidates) == 1:
                raise CheckpointError(
                    f"{message}. Resume from another checkpoint (or --resume auto, which falls "
                    f"back to the newest intact one)."
                )
            self._report(f"CHECKPOINT DAMAGED, NOT USED: {message}")
        if problems_seen:
            raise CheckpointError(
                "no intact checkpoint to resume from: " + " | ".join(problems_seen)
            )
        return None

    # --------------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        *,
        stage_state: StageState,
        rank_state: dict,
        ema: dict[str, torch.Tensor] | None,
        arch: dict,
        config: dict,
    ) -> str:
        """Collective. Saves `step`: the backend's state (`stage_state`), this rank's trainer
        state and, from rank 0, the EMA (full tensors) as a self-describing safetensors file;
        rank 0 commits meta.json and prunes. In the background unless `background` is off (see
        the module docstring). Returns the step directory's URL; write errors name the file
        (disk full, permissions)."""
        self.check_owned()
        self.wait()
        name = step_dir_name(step)
        main_then_share(self.info, lambda: make_room(self.root, step, self.lineage, self._report))
        local_dir = (
            self.store.path(name) if self.store.local else tempfile.mkdtemp(prefix="arflow-ckpt-")
        )
        try:
            os.makedirs(local_dir, exist_ok=True)
            write_state = stage_state(local_dir, self._stager)
            if self._stager is not None:
                rank_state = self._stager(rank_state, "rank")
                ema = None if ema is None else self._stager(ema, "ema")
        except BaseException:
            if not self.store.local:
                shutil.rmtree(local_dir, ignore_errors=True)
            raise
        job = (step, local_dir, write_state, rank_state, ema, arch, config)
        if not self.background:
            self._persist(*job, group=None)
        else:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
            self._pending = self._writer.submit(self._persist, *job, group=self._group)
        return self.store.url_of(name)

    def wait(self) -> None:
        """Block until the save in flight, if any, is committed; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def raise_if_failed(self) -> None:
        """Raise the error of a background save that has failed (no waiting, no device sync)."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def _persist(
        self,
        step: int,
        local_dir: str,
        write_state: StateWriter,
        rank_state: dict,
        ema: dict | None,
        arch: dict,
        config: dict,
        group,
    ) -> None:
        """Write, upload, commit, prune (every rank; collectives on `group`)."""
        t0 = time.perf_counter()
        name = step_dir_name(step)
        url = self.store.url_of(name)
        recorder = FileRecorder(local_dir)
        error, records = None, {}
        try:
            with recorder.open(rank_file(self.info.rank)) as f:
                torch.save(rank_state, f)
            if ema is not None:
                with recorder.open(EMA_FILE) as f:
                    f.write(weights_bytes(ema, arch, config))
            write_state(recorder, group)
            if not self.store.local:
                recorder.add_unrecorded(list_files(local_dir))
                self.store.upload(local_dir, sorted(recorder.records), name)
            records = recorder.records
        except Exception as failure:  # reported on every rank below, not left hanging here
            err = failure
            try:  # the file and errno of a write that a library reported as something else
                recorder.raise_write_error()
            except OSError as named:
                err = named
            traceback.print_exc()
            error = f"{type(err).__name__}: {err}"
        finally:
            if not self.store.local:
                shutil.rmtree(local_dir, ignore_errors=True)
        errors = gather_errors(self.info, error, group)
        if errors:
            raise OSError(f"saving step {step} to {url} failed: " + "; ".join(errors))
        every = all_gather(self.info, records, group)
        pruned = main_then_share(self.info, lambda: self._commit(step, every, config), group)
        if self.info.is_main:
            if pruned:
                print(f"pruned checkpoints at steps {pruned} (checkpoint.keep_last)", flush=True)
            if self.background:
                seconds = time.perf_counter() - t0
                print(
                    f"step {step}: checkpoint {url} committed ({seconds:.2f} s in the background)",
                    flush=True,
                )

    def _commit(self, step: int, every: list[dict], config: dict) -> list[int]:
        """Rank 0: meta.json (the commit marker), then retention."""
        name = step_dir_name(step)
        files = {}
        for records in every:
            files.update(records)
        if self.store.local:  # files a library wrote by itself: hashed once, read back
            target = self.store.path(name)
            for rel in list_files(target):
                if rel not in files:
                    files[rel] = file_record(os.path.join(target, rel))
        meta = {
            "arflow_checkpoint_version": VERSION,
            "step": step,
            "world_size": self.info.world_size,
            "precision": self.precision,
            "run_id": self.run_id,
            "lineage": self.lineage,
            "saved_at": time.time(),
            "config": config,
            "files": files,
        }
        self.store.write_atomic(f"{name}/{META}", json.dumps(meta, indent=1).encode())
        self.root.remember(step, meta)
        return prune(
            self.root, self.lineage, self.keep_last, self.start.url if self.start else None
        )

    # -------------------------------------------------------------------------- loading
    def load_rank_state(self, found: Found, rank: int) -> dict:
        """A rank's trainer state, loaded weights-only (nothing in it can run code)."""
        path = os.path.join(found.local, rank_file(rank))
        try:
            return load_torch_file(path)
        except CorruptFileError as err:
            raise CheckpointError(f"step {found.step}: {err}") from None

    def load_ema(self, found: Found) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = os.path.join(found.local, EMA_FILE)
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"step {found.step}: {path} is unreadable: {err}") from None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)
