"""Checkpoint directories: layout, atomic commit, discovery, retention, fsspec URLs.

    <root>/step_000001000/
        meta.json          written last, by rank 0, after every rank finished writing
        trainer/rank_00000.pt ...  per-rank RNG states and data-loader state
        ...                the backend's files (DCP shards, or DeepSpeed's ZeRO folder + EMA)

A step directory counts only once `meta.json` exists, so a run killed mid-save leaves the
previous checkpoint as the latest; incomplete directories are deleted at the next start. The
root may be a local or shared path or an fsspec URL (s3://...). Remote checkpoints are staged
in a local temporary directory per rank and uploaded (saving) or downloaded (loading).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem

from arflow.distributed.env import DistInfo

META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


@dataclass
class Found:
    step: int
    url: str  # the step directory
    meta: dict


class CheckpointManager:
    def __init__(self, root: str, info: DistInfo, keep_last: int):
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.url = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.info = info
        self.keep_last = keep_last

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _url(self, step: int) -> str:
        """A step directory as a path (local) or a URL with its protocol (remote)."""
        name = step_dir_name(step)
        return self._path(name) if self.local else f"{self.url}/{name}"

    # ------------------------------------------------------------------------- discovery
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

    def latest(self) -> Found | None:
        steps = self.complete_steps()
        return self.find(self._url(steps[-1])) if steps else None

    def find(self, url: str) -> Found:
        """A complete step directory, given as its own URL or as a checkpoint root (newest)."""
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(f"{path.rstrip('/')}/{META}"):
            other = CheckpointManager(url, self.info, self.keep_last)
            steps = other.complete_steps()
            if not steps:
                raise FileNotFoundError(
                    f"no complete checkpoint at {url} (a step_* directory with {META})"
                )
            return other.latest()
        with fs.open(f"{path.rstrip('/')}/{META}") as f:
            meta = json.load(f)
        if isinstance(fs, LocalFileSystem):
            url = path
        return Found(meta["step"], url.rstrip("/"), meta)

    # ---------------------------------------------------------------------------- saving
    def save(self, step: int, write: Callable[[str], None], meta: dict) -> str:
        """Collective: every rank calls `write(local_dir)` for its own files, then rank 0
        commits. Returns the step directory's URL."""
        name = step_dir_name(step)
        target = self._path(name)
        if self.info.is_main and self.fs.exists(target):
            self.fs.rm(target, recursive=True)  # a leftover of an interrupted save of this step
        dist.barrier()
        if self.local:
            os.makedirs(target, exist_ok=True)
            write(target)
        else:
            staging = tempfile.mkdtemp(prefix="arflow-ckpt-")
            try:
                write(staging)
                self.fs.put(staging.rstrip("/") + "/", target, recursive=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()  # every rank's files are in place
        if self.info.is_main:
            payload = json.dumps(dict(meta, step=step, saved_at=time.time()), indent=2)
            if self.local:
                tmp = f"{target}/{META}.tmp"
                with open(tmp, "w") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, f"{target}/{META}")
            else:
                self.fs.pipe(f"{target}/{META}", payload.encode())  # object stores: atomic put
            self.prune()
        dist.barrier()
        return self._url(step)

    def prune(self) -> None:
        """Rank 0: keep the newest `keep_last` complete checkpoints."""
        for step in self.complete_steps()[: -self.keep_last]:
            self.fs.rm(self._path(step_dir_name(step)), recursive=True)

    def remove_incomplete(self) -> list[int]:
        """Rank 0, at start-up: delete step directories without meta.json (killed saves)."""
        removed = []
        for step, d in self._step_dirs().items():
            if not self.fs.exists(f"{d}/{META}"):
                self.fs.rm(d, recursive=True)
                removed.append(step)
        return removed


def fetch(found: Found) -> tuple[str, bool, Callable[[], None]]:
    """A local directory holding `found`: (path, shared by all ranks, cleanup)."""
    fs, path = fsspec.core.url_to_fs(found.url)
    if isinstance(fs, LocalFileSystem):
        return path, True, lambda: None
    local = tempfile.mkdtemp(prefix="arflow-resume-")
    fs.get(path.rstrip("/") + "/", local, recursive=True)
    return local, False, lambda: shutil.rmtree(local, ignore_errors=True)
