"""What a checkpoint root holds, the names in it, and what a step directory's meta.json must
say before anything in it is trusted.

    <root>/
        .arflow.lock           the run lock (arflow.storage.lock): one run writes here at a time
        HEAD.json              the lineage `--resume auto` continues (lineage.py)
        step_000001000/
            meta.json          written last, by rank 0: the commit marker (see parse_meta)
            ema.safetensors    EMA weights, consolidated, self-describing (load_pretrained)
            trainer/rank_00000.pt  per-rank RNG / data-loader state (tensors and plain values)
            ...                the backend's files (DCP shards, or DeepSpeed's zero/ folder)
        step_000000500.abandoned-<run>   a step another lineage reached first (retain.py)
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field

from arflow.config import ConfigError
from arflow.storage import Store
from arflow.storage.hashing import bad_record, unsafe_relpath

META = "meta.json"
HEAD = "HEAD.json"
VERSION = 2
STEP_DIGITS = 9
MAX_STEP = 10**STEP_DIGITS - 1
MAX_META_BYTES = 64 << 20  # a config and one record per file: far below this
_STEP_DIR = re.compile(rf"^step_(\d{{{STEP_DIGITS}}})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, unreadable, of another format)."""


class CheckpointDirInUse(ConfigError):
    """A checkpoint directory whose checkpoints this start may not take or ignore by itself."""


def step_dir_name(step: int) -> str:
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} does not fit a {STEP_DIGITS}-digit step directory name")
    return f"step_{step:0{STEP_DIGITS}d}"


def step_of(name: str) -> int | None:
    """The step of a step directory's name, None for any other name."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def rank_file(rank: int) -> str:
    return f"trainer/rank_{rank:05d}.pt"


@dataclass
class Found:
    """A complete checkpoint: step directory `name` in `store`, its validated meta.json, and
    once fetched a readable local copy (`local`; `shared` when every rank reads the same one)."""

    step: int
    store: Store = field(repr=False)
    name: str
    meta: dict = field(repr=False)
    local: str | None = field(default=None, repr=False)
    shared: bool = True
    _download: str | None = field(default=None, repr=False)  # deleted by release()

    @property
    def url(self) -> str:
        return self.store.url_of(self.name)

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    def release(self) -> None:
        if self._download is not None:
            shutil.rmtree(self._download, ignore_errors=True)
            self._download = None
        self.local = None


def _is_int(value, low: int, high: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )


def parse_meta(raw: bytes, url: str, step: int | None = None) -> dict:
    """The meta.json of the step directory at `url` (of step `step`), validated: a checkpoint of
    another format version, or a meta.json that is not what arflow writes (wrong types, a step
    other than its directory's, a listed path that is absolute, escapes the directory or is
    meta.json itself, an impossible size), raises CheckpointError naming it."""
    where = f"{url}/{META}"
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{where} is corrupt (not JSON: {err})") from None
    if not isinstance(meta, dict) or not _is_int(meta.get("step"), 0, MAX_STEP):
        raise CheckpointError(f"{where} is corrupt (no valid step recorded)")
    version = meta.get("arflow_checkpoint_version")
    if version != VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {version!r}, this arflow reads {VERSION} "
            f"(checksums and lineage); use the arflow version that wrote it"
        )
    problem = _meta_problem(meta, step)
    if problem:
        raise CheckpointError(f"{where} is corrupt or forged ({problem}); not used")
    return meta


def _meta_problem(meta: dict, step: int | None) -> str | None:
    if step is not None and meta["step"] != step:
        return f"it records step {meta['step']}, its directory is step {step}"
    if not (isinstance(meta.get("run_id"), str) and meta["run_id"]):
        return "run_id is not a string"
    if not _is_int(meta.get("world_size"), 1):
        return f"world_size {meta.get('world_size')!r} is not a positive integer"
    if not isinstance(meta.get("config"), dict):
        return "config is not an object"
    lineage = meta.get("lineage")
    if not (isinstance(lineage, list) and lineage) or any(
        not isinstance(e, dict)
        or not isinstance(e.get("run"), str)
        or ("until" in e and not _is_int(e["until"], 0, MAX_STEP))
        for e in lineage
    ):
        return "lineage is not a list of {run, until} entries"
    files = meta.get("files")
    if not isinstance(files, dict):
        return "files is not an object"
    for rel, record in files.items():
        why = unsafe_relpath(rel) or ("the commit marker itself" if rel == META else None)
        why = why or bad_record(record)
        if why:
            return f"listed file {rel!r}: {why}"
    return None
