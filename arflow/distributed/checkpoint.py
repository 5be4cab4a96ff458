"""Checkpoints: the one component that owns their directories, the commit marker, the per-rank
files, integrity, ownership, retention, compatibility and resharding decisions. Backends only
hand over their own state (`Backend.save_state` / `load_state`, and the EMA through
`gather_full` / `shard_full`).

    <root>/
        .arflow.lock       the run lock (run_lock.py): one run writes here at a time
        HEAD.json          the lineage `--resume auto` continues (written when a run starts)
        step_000001000/
            meta.json      written last, by rank 0: step, world size, config, lineage, and the
                           size and SHA-256 of every other file (the commit marker)
            ema.safetensors      EMA weights, consolidated, self-describing (load_pretrained)
            trainer/rank_00000.pt  per-rank RNG / data-loader state (tensors and plain values)
            ...            the backend's files (DCP shards, or DeepSpeed's zero/ folder)

Guarantees. Atomic: a step directory counts only once `meta.json` exists, written after every
rank's files are on disk (fsync'd); directories without it are removed at the next start.
Verified: every file is checked against meta.json before it is read; a damaged checkpoint is
named (file and step) and the newest older intact checkpoint of the lineage is used instead.
Locked: one run per directory. Retention: `keep_last` applies to the run's own lineage only;
the checkpoint a run started from and checkpoints of other lineages are never deleted.

Lineage: each run has an id; a checkpoint's meta.json lists the chain of runs that led to it
(each earlier run up to the step the next one started from). A run that starts from an older
checkpoint (a rollback) starts a new branch: HEAD.json names it, so `--resume auto` continues
the branch, not the abandoned later steps, which stay on disk untouched (moved aside to
`step_X.abandoned-<run>` only when the new branch saves the same step).

The root may be a local or shared path or an fsspec URL (s3://...). Remote checkpoints are
staged in a local directory per rank and uploaded, or downloaded before loading.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem

from arflow.config import Config, ConfigError, ModelConfig
from arflow.distributed.env import DistInfo
from arflow.distributed.run_lock import LocalLock, run_lock
from arflow.models.pretrained import EMA_FILE, weights_bytes
from arflow.utils.integrity import FileRecorder, file_record, list_files, verify_files
from arflow.utils.safe_load import CorruptFileError, load_torch_file

META = "meta.json"
HEAD = "HEAD.json"
VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, unreadable, of another format)."""


class CheckpointDirInUse(ConfigError):
    """A fresh run pointed at a directory holding another run's checkpoints."""


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def rank_file(rank: int) -> str:
    return f"trainer/rank_{rank:05d}.pt"


@dataclass
class Found:
    """A complete checkpoint: its step, URL (a local path for local ones) and meta.json."""

    step: int
    url: str
    meta: dict
    storage_options: dict = field(default_factory=dict, repr=False)
    local: str | None = field(default=None, repr=False)  # a local copy once fetched
    shared: bool = True  # every rank reads the same `local`
    _download: str | None = field(default=None, repr=False)  # deleted by release()

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")

    def release(self) -> None:
        if self._download is not None:
            shutil.rmtree(self._download, ignore_errors=True)
            self._download = None
        self.local = None


def in_lineage(meta: dict, lineage: list[dict]) -> bool:
    """Whether the checkpoint of `meta` lies on `lineage` (written by one of its runs, before
    the step the next run of the lineage started from)."""
    run, step = meta.get("run_id"), meta.get("step")
    return any(e["run"] == run and ("until" not in e or step <= e["until"]) for e in lineage)


def continued_lineage(start: Found | None, run_id: str) -> list[dict]:
    """The lineage of a run starting from `start` (None: a fresh run)."""
    if start is None:
        return [{"run": run_id}]
    parent = [dict(e) for e in start.meta.get("lineage", [{"run": start.run_id}])]
    parent[-1]["until"] = start.step
    return [*parent, {"run": run_id}]


def read_meta(fs, step_dir: str, url: str) -> dict:
    """A step directory's meta.json; a damaged one is named."""
    path = f"{step_dir}/{META}"
    try:
        meta = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{url}/{META} is corrupt (not JSON: {err})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{url}/{META} is corrupt (no step recorded)")
    return meta


def _is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def main_then_share(info: DistInfo | None, fn: Callable):
    """Run `fn` on rank 0 and hand its result, or its error, to every rank (so a failure on
    rank 0 is raised everywhere instead of leaving the others waiting in a collective)."""
    if info is None or info.world_size == 1:
        return fn()
    box = [None, None]
    if info.is_main:
        try:
            box[0] = fn()
        except Exception as err:  # re-raised below, on every rank
            try:
                pickle.dumps(err)
                box[1] = err
            except Exception:  # an error object that cannot travel: its message can
                box[1] = RuntimeError(f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def gather_errors(info: DistInfo | None, error: str | None) -> list[str]:
    """Every rank's error message (collective); [] when no rank failed."""
    if info is None or info.world_size == 1:
        return [error] if error else []
    out = [None] * info.world_size
    dist.all_gather_object(out, error)
    return [f"rank {r}: {e}" for r, e in enumerate(out) if e]


class CheckpointManager:
    def __init__(
        self,
        root: str,
        info: DistInfo | None,
        keep_last: int = 1,
        storage_options: dict | None = None,
    ):
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(root, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.url = root.rstrip("/")
        self.local = _is_local(self.fs)
        self.info = info
        self.keep_last = keep_last
        self.run_id = uuid.uuid4().hex[:12]
        self.lineage = [{"run": self.run_id}]
        self.start: Found | None = None
        self._locks = []
        self._metas: dict[int, dict] = {}

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _url(self, *parts: str) -> str:
        """A path under the root as a local path or a URL with its protocol."""
        return self._path(*parts) if self.local else "/".join([self.url, *parts])

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

        def lock_and_clean():
            locks = [LocalLock(run_dir, self.run_id)] if run_dir else []
            if not (run_dir and self.local and _inside(self.root, run_dir)):
                locks.append(run_lock(self.url, self.run_id, self.storage_options))
            try:
                for lock in locks:
                    lock.acquire()
                    self._locks.append(lock)
            except BaseException:
                self.close()
                raise
            atexit.register(self.close)  # also when start-up fails after this point
            return self.remove_incomplete()

        return main_then_share(self.info, lock_and_clean)

    def _probe(self) -> None:
        """Write, read back and delete a small file in the root."""
        name = f".write-probe-{uuid.uuid4().hex[:8]}"
        if self.local:
            try:
                os.makedirs(self.root, exist_ok=True)
                recorder = FileRecorder(self.root)
                with recorder.open(name) as f:
                    f.write(b"arflow")
            except OSError as err:
                raise OSError(f"cannot write under {self.root}: {err}") from None
            finally:
                if os.path.exists(os.path.join(self.root, name)):
                    os.remove(os.path.join(self.root, name))
            return
        bucket = self.root.split("/", 1)[0]
        if hasattr(self.fs, "split_path") and not self.fs.exists(bucket):  # s3fs, gcsfs
            raise OSError(
                f"bucket {bucket!r} of checkpoint.dir {self.url} does not exist (or is not "
                f"visible with these credentials); create it first: arflow never creates buckets"
            )
        try:
            self.fs.pipe_file(self._path(name), b"arflow")
            if self.fs.cat_file(self._path(name)) != b"arflow":
                raise OSError(f"{self._url(name)} read back differently")
            self.fs.rm_file(self._path(name))
        except OSError as err:
            raise OSError(f"cannot write under {self.url}: {err}") from None

    def check_owned(self) -> None:
        """Raise if another run took the lock over (the object-store lock's heartbeat lost)."""
        lost = any(getattr(lock, "lost", False) for lock in self._locks)
        if main_then_share(self.info, lambda: lost):
            raise RuntimeError(
                f"the run lock on {self.url} was taken over by another run; this run stops "
                f"without writing or deleting anything more there"
            )

    def close(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []

    # --------------------------------------------------------------------- discovery
    def _step_dirs(self) -> dict[int, str]:
        if not self.fs.exists(self.root):
            return {}
        out = {}
        for entry in self.fs.ls(self.root, detail=False):
            m = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out[int(m.group(1))] = entry.rstrip("/")
        return out

    def complete_steps(self) -> list[int]:
        return sorted(s for s, d in self._step_dirs().items() if self.fs.exists(f"{d}/{META}"))

    def meta(self, step: int) -> dict:
        if step not in self._metas:
            self._metas[step] = read_meta(
                self.fs, self._path(step_dir_name(step)), self._url(step_dir_name(step))
            )
        return self._metas[step]

    def found(self, step: int) -> Found:
        return Found(step, self._url(step_dir_name(step)), self.meta(step), self.storage_options)

    def head(self) -> dict | None:
        path = self._path(HEAD)
        if not self.fs.exists(path):
            return None
        try:
            return json.loads(self.fs.cat_file(path))
        except ValueError as err:
            raise CheckpointError(f"{self._url(HEAD)} is corrupt ({err}); delete it") from None

    def candidates(self) -> list[Found]:
        """What `--resume auto` tries, newest first: the checkpoints of the lineage HEAD.json
        names (the newest run's own, then the one it started from and its ancestors); every
        complete checkpoint when there is no HEAD. A checkpoint whose meta.json is damaged is
        reported and skipped."""
        head = self.head()
        out, damaged = [], []
        for step in sorted(self.complete_steps(), reverse=True):
            try:
                meta = self.meta(step)
            except CheckpointError as err:
                damaged.append(str(err))
                continue
            if head is None or in_lineage(meta, head["lineage"]):
                out.append(self.found(step))
        if head is not None and head.get("from") and not any(f.url == head["from"] for f in out):
            try:
                out.append(find_checkpoint(head["from"], self.storage_options))
            except (FileNotFoundError, CheckpointError) as err:
                damaged.append(str(err))
        for message in damaged:
            _loud(self.info, f"CHECKPOINT SKIPPED: {message}")
        return sorted(out, key=lambda f: f.step, reverse=True)

    def latest(self) -> Found | None:
        found = self.candidates()
        return found[0] if found else None

    # -------------------------------------------------------------------------- resume
    def resume_target(self, resume: str | None, overwrite: bool) -> Found | None:
        """Collective: the verified checkpoint to start from (fetched: `found.local` is
        readable on this rank), or None for a fresh start. Records the run's lineage and, on
        rank 0, HEAD.json. `resume`: None, "auto", or a step directory / checkpoint root."""
        if resume and overwrite:
            raise ConfigError(
                "--overwrite starts afresh and --resume continues a checkpoint: give one of them"
            )

        def choose():
            if resume == "auto":
                return self.candidates()
            if resume is not None:
                return _explicit_candidates(resume, self.storage_options, self.info)
            existing = self.complete_steps()
            if existing:
                if not overwrite:
                    raise CheckpointDirInUse(
                        f"checkpoint.dir {self.url} already holds complete checkpoints (steps "
                        f"{', '.join(map(str, existing))}). Pass --resume auto to continue them, "
                        f"--resume PATH to start from one, or --overwrite to delete them and start "
                        f"afresh (or choose another checkpoint.dir)."
                    )
                for step in existing:
                    self.fs.rm(self._path(step_dir_name(step)), recursive=True)
                if self.fs.exists(self._path(HEAD)):
                    self.fs.rm_file(self._path(HEAD))
                _loud(None, f"--overwrite: deleted checkpoints {existing} in {self.url}")
            return []

        candidates = main_then_share(self.info, choose)
        found = self._first_intact(candidates, explicit=resume not in (None, "auto"))
        self.start = found
        self.lineage = continued_lineage(found, self.run_id)

        def write_head():
            head = {
                "run": self.run_id,
                "lineage": self.lineage,
                "from": found.url if found else None,
                "started_at": time.time(),
            }
            write_atomic(self.fs, self._path(HEAD), json.dumps(head, indent=2).encode())

        main_then_share(self.info, write_head)
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
            _loud(self.info, f"CHECKPOINT DAMAGED, NOT USED: {message}")
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
        write_state: Callable[[str, FileRecorder], None],
        rank_state: dict,
        ema: dict[str, torch.Tensor] | None,
        arch: dict,
        config: dict,
        world_size: int,
    ) -> str:
        """Collective. Every rank writes its rank file and `write_state(local_dir, recorder)`
        (the backend's files); rank 0 writes the EMA (full tensors, given on rank 0) as a
        self-describing safetensors file, then commits meta.json and prunes. Returns the step
        directory's URL. Write errors name the file (disk full, permissions)."""
        self.check_owned()
        name = step_dir_name(step)
        target = self._path(name)

        def prepare():
            if not self.fs.exists(target):
                return
            if self.fs.exists(f"{target}/{META}"):
                meta = self.meta(step)
                if not in_lineage(meta, self.lineage):
                    aside = f"{name}.abandoned-{meta.get('run_id')}"
                    self.fs.mv(target, self._path(aside), recursive=True)
                    _loud(
                        None,
                        f"step {step} of another lineage (run {meta.get('run_id')}) moved to "
                        f"{self._url(aside)} to make room for this run's step {step}",
                    )
                    self._metas.pop(step, None)
                    return
            self.fs.rm(target, recursive=True)  # this lineage's leftover (interrupted save)
            self._metas.pop(step, None)

        main_then_share(self.info, prepare)
        local_dir = target if self.local else tempfile.mkdtemp(prefix="arflow-ckpt-")
        error, records = None, {}
        try:
            os.makedirs(local_dir, exist_ok=True)
            recorder = FileRecorder(local_dir)
            with recorder.open(rank_file(self.info.rank)) as f:
                torch.save(rank_state, f)
            if ema is not None:
                with recorder.open(EMA_FILE) as f:
                    f.write(weights_bytes(ema, arch, config))
            write_state(local_dir, recorder)
            if not self.local:
                recorder.add_unrecorded(list_files(local_dir))
                files = sorted(recorder.records)
                self.fs.put(
                    [os.path.join(local_dir, f) for f in files],
                    [f"{target}/{f}" for f in files],
                )
            records = recorder.records
        except Exception as err:  # reported on every rank below, not left hanging here
            traceback.print_exc()
            error = f"{type(err).__name__}: {err}"
        finally:
            if not self.local:
                shutil.rmtree(local_dir, ignore_errors=True)
        errors = gather_errors(self.info, error)
        if errors:
            raise OSError(f"saving step {step} to {self._url(name)} failed: " + "; ".join(errors))
        every = [records]
        if self.info.world_size > 1:
            every = [None] * self.info.world_size
            dist.all_gather_object(every, records)

        def commit():
            files = {}
            for r in every:
                files.update(r)
            if self.local:  # files a library wrote by itself: hashed once, read back
                for rel in list_files(target):
                    if rel not in files:
                        files[rel] = file_record(os.path.join(target, rel))
            meta = {
                "arflow_checkpoint_version": VERSION,
                "step": step,
                "world_size": world_size,
                "run_id": self.run_id,
                "lineage": self.lineage,
                "saved_at": time.time(),
                "config": config,
                "files": files,
            }
            write_atomic(self.fs, f"{target}/{META}", json.dumps(meta, indent=1).encode())
            self._metas[step] = meta
            return self.prune()

        pruned = main_then_share(self.info, commit)
        if pruned and self.info.is_main:
            print(f"pruned checkpoints at steps {pruned} (checkpoint.keep_last)", flush=True)
        return self._url(name)

    def prune(self) -> list[int]:
        """Rank 0: delete this lineage's checkpoints beyond the newest `keep_last`, never the
        one the run started from, never another lineage's."""
        start = self.start.url if self.start is not None else None
        ours = []
        for step in self.complete_steps():
            try:
                meta = self.meta(step)
            except CheckpointError:
                continue  # never delete what cannot be identified
            if in_lineage(meta, self.lineage) and self._url(step_dir_name(step)) != start:
                ours.append(step)
        doomed = sorted(ours)[: -self.keep_last]
        for step in doomed:
            self.fs.rm(self._path(step_dir_name(step)), recursive=True)
            self._metas.pop(step, None)
        return doomed

    def remove_incomplete(self) -> list[int]:
        """Rank 0, at start-up: delete step directories without meta.json (killed saves)."""
        removed = []
        for step, d in self._step_dirs().items():
            if not self.fs.exists(f"{d}/{META}"):
                self.fs.rm(d, recursive=True)
                removed.append(step)
        return removed

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


def write_atomic(fs, path: str, payload: bytes) -> None:
    """A file that appears whole or not at all: local files are written under a temporary
    name, fsync'd and renamed (then the directory fsync'd); an object-store put is atomic."""
    if not _is_local(fs):
        fs.pipe_file(path, payload)
        return
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror} (writing {path})", path) from None


def _loud(info: DistInfo | None, message: str) -> None:
    if info is None or info.is_main:
        bar = "!" * 80
        print(f"{bar}\n{message}\n{bar}", flush=True)


# ------------------------------------------------------------------ offline discovery
def find_checkpoint(url: str, storage_options: dict | None = None) -> Found:
    """A complete checkpoint given as its step directory, or as a checkpoint root (what
    `--resume auto` would take there). Not fetched yet."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/")
    found = _step_dir(fs, path, url, storage_options)
    if found is not None:
        return found
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint {url} does not exist")
    found = CheckpointManager(url, None, storage_options=storage_options).latest()
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at {url} (a step_* directory with {META})")
    return found


def _step_dir(fs, path: str, url: str, storage_options: dict | None) -> Found | None:
    """The checkpoint at `path` when it is a complete step directory, else None."""
    path, url = path.rstrip("/"), url.rstrip("/")
    if not fs.exists(f"{path}/{META}"):
        return None
    meta = read_meta(fs, path, url)
    return Found(meta["step"], path if _is_local(fs) else url, meta, storage_options or {})


def _explicit_candidates(url: str, storage_options: dict, info) -> list[Found]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    found = _step_dir(fs, path, url, storage_options)
    if found is not None:
        return [found]
    if not fs.exists(path):
        raise FileNotFoundError(f"--resume {url}: no such checkpoint")
    found = CheckpointManager(url, info, storage_options=storage_options).candidates()
    if not found:
        raise FileNotFoundError(f"--resume {url}: no complete checkpoint there")
    return found


def fetch(found: Found) -> None:
    """Make `found` readable on this rank: a local path as it is, a remote one downloaded into
    a temporary directory (per rank), deleted by `found.release()`."""
    if found.local is not None:
        return
    fs, path = fsspec.core.url_to_fs(found.url, **found.storage_options)
    if _is_local(fs):
        found.local, found.shared = path, True
        return
    local = tempfile.mkdtemp(prefix="arflow-resume-")
    try:
        fs.get(path.rstrip("/") + "/", local, recursive=True)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    found.local, found.shared, found._download = local, False, local


def verify(found: Found, info: DistInfo | None = None) -> list[str]:
    """Fetch `found` and check every file meta.json lists (collective when `info` is given:
    ranks share the work on a shared directory). Returns the problems, [] when intact."""
    version = found.meta.get("arflow_checkpoint_version")
    if version != VERSION:
        return [
            f"{META}: checkpoint format version {version!r}, this arflow reads {VERSION} "
            f"(checksums and lineage); use the arflow version that wrote it"
        ]
    error = None
    try:
        fetch(found)
    except OSError as err:
        error = f"cannot download: {err}"
    errors = gather_errors(info, error)
    if errors:
        return errors
    files = found.meta.get("files", {})
    names = sorted(files)
    if found.shared and info is not None and info.world_size > 1:
        names = names[info.rank :: info.world_size]
    problems = verify_files(found.local, files, only=names)
    if info is None or info.world_size == 1:
        return problems
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, problems)
    return sorted({p for ps in everyone for p in ps})


# ------------------------------------------------------------------- compatibility
def check_compatible(found: Found, cfg: Config, world_size: int) -> bool:
    """Fail clearly if the checkpoint cannot be resumed with `cfg`. Returns whether its
    layout differs from this run's (another world size or ZeRO stage: load resharding)."""
    saved = found.meta["config"]
    saved_arch = ModelConfig(**saved["model"]).architecture()
    arch = cfg.model.architecture()
    # Only whether label dropout is on changes a shape (the null-class row), not its rate.
    for a in (saved_arch, arch):
        a["class_dropout_prob"] = a["class_dropout_prob"] > 0
    diff = [
        f"model.{k}: checkpoint {saved_arch[k]!r}, config {arch[k]!r}"
        for k in arch
        if saved_arch[k] != arch[k]
    ]
    if diff:
        raise ConfigError(
            f"checkpoint {found.url} does not fit this config; parameter shapes would change "
            f"({'; '.join(diff)}). Start a new run (another checkpoint.dir) to train a new shape."
        )
    backend = saved["parallel"]["backend"]
    if backend != cfg.parallel.backend:
        raise ConfigError(
            f"parallel.backend: checkpoint {found.url} was written by {backend!r}, the config "
            f"uses {cfg.parallel.backend!r}; optimizer-state layouts differ between backends"
        )
    stage_changed = (
        backend == "deepspeed" and saved["parallel"]["zero_stage"] != cfg.parallel.zero_stage
    )
    return found.meta["world_size"] != world_size or stage_changed
