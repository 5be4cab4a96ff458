"""Checkpoints: the one component that owns checkpoint directories, the commit marker, the
per-rank files, integrity, ownership, retention, compatibility and resharding decisions.

Guarantees. Atomic: a step directory counts only once `meta.json` exists, written after every
rank's files are on disk (fsync'd) or uploaded; directories without it are removed at the next
start. Verified: nothing in a checkpoint is trusted — meta.json and HEAD.json are validated, every
listed file is checked against its recorded size and SHA-256 before it is read, and a damaged
checkpoint is named (file and step) and the newest older intact checkpoint of the lineage is used
instead. Locked: one run per directory. Retention: `keep_last` applies to the run's own lineage
only; the checkpoint a run started from and checkpoints of other lineages are never deleted.
Saves run in the background (the trainer waits only for a copy in host memory).

The parts, each small: `layout` (names, meta.json), `lineage` (HEAD.json, which checkpoints a run
continues), `locate` (read-only lookup: resume, convert, sample and evaluate use the same rule),
`verify` (fetch and check), `retain` (clean-up, moving aside, pruning), `compat` (config changes),
`manager` (what the trainer calls: open, resume, save, wait, close), `export` (weights out of a
checkpoint, offline). Storage itself — retries, locks, object-by-object operations — is
`arflow.storage`'s.
"""

from arflow.checkpoint.compat import check_compatible
from arflow.checkpoint.layout import (
    HEAD,
    META,
    CheckpointDirInUse,
    CheckpointError,
    Found,
    step_dir_name,
)
from arflow.checkpoint.locate import CheckpointRoot, find_checkpoint
from arflow.checkpoint.manager import CheckpointManager
from arflow.checkpoint.verify import fetch, verify

__all__ = [
    "HEAD",
    "META",
    "CheckpointDirInUse",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointRoot",
    "Found",
    "check_compatible",
    "fetch",
    "find_checkpoint",
    "step_dir_name",
    "verify",
]
