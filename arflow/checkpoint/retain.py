"""What is deleted or moved in a checkpoint root, and when (rank 0 only).

- `remove_incomplete`: at start-up, step directories without meta.json (killed saves).
- `make_room`: before a save, the step directory of the same number: this lineage's leftover is
  deleted; another lineage's complete checkpoint is moved aside to `step_X.abandoned-<run>`,
  never deleted (a rollback that reaches a step the abandoned branch had saved).
- `prune`: after a save, this lineage's checkpoints beyond the newest `keep_last`; never the
  one the run started from, never another lineage's, never one whose meta.json is unreadable.

Deletions remove meta.json first and moves copy it last (arflow.storage.Store), so a crash at
any point leaves either a complete checkpoint or an incomplete directory that the next start
removes, and the operation can simply be repeated.
"""

from __future__ import annotations

from collections.abc import Callable

from arflow.checkpoint.layout import HEAD, META, CheckpointError, step_dir_name
from arflow.checkpoint.lineage import in_lineage
from arflow.checkpoint.locate import CheckpointRoot

Report = Callable[[str], None]


def remove_incomplete(root: CheckpointRoot) -> list[int]:
    removed = []
    for step, name in sorted(root.step_dirs().items()):
        if not root.store.exists(f"{name}/{META}"):
            root.store.remove_tree(name)
            root.forget(step)
            removed.append(step)
    return removed


def remove(root: CheckpointRoot, step: int) -> None:
    """Delete a step directory, its commit marker first."""
    root.store.remove_tree(step_dir_name(step), first=[META])
    root.forget(step)


def make_room(root: CheckpointRoot, step: int, lineage: list[dict], report: Report) -> None:
    name = step_dir_name(step)
    if not root.store.exists(name):
        return
    if root.store.exists(f"{name}/{META}"):
        try:
            meta = root.meta(step)
        except CheckpointError:
            meta = None  # unreadable: kept, as another lineage's would be
        if meta is None or not in_lineage(meta, lineage):
            run = meta["run_id"] if meta else "unknown"
            aside = f"{name}.abandoned-{run}"
            root.store.move_tree(name, aside, last=[META])
            root.forget(step)
            report(
                f"step {step} of another lineage (run {run}) moved to "
                f"{root.store.url_of(aside)} to make room for this run's step {step}"
            )
            return
    remove(root, step)  # this lineage's leftover (an interrupted or superseded save)


def prune(root: CheckpointRoot, lineage: list[dict], keep_last: int, keep: str | None) -> list[int]:
    """Delete this lineage's checkpoints beyond the newest `keep_last`, except the one at URL
    `keep` (the run's starting point). Returns the steps deleted."""
    ours = []
    for step in root.complete_steps():
        try:
            meta = root.meta(step)
        except CheckpointError:
            continue  # never delete what cannot be identified
        if in_lineage(meta, lineage) and root.store.url_of(step_dir_name(step)) != keep:
            ours.append(step)
    doomed = sorted(ours)[:-keep_last]
    for step in doomed:
        remove(root, step)
    return doomed


def remove_all(root: CheckpointRoot) -> list[int]:
    """`--overwrite`: every step directory and HEAD.json."""
    steps = sorted(root.step_dirs())
    for step in steps:
        remove(root, step)
    root.store.remove(HEAD)
    return steps
