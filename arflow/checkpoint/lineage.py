"""Lineage: which checkpoints belong to the history a run continues.

Each run has an id; a checkpoint's meta.json lists the chain of runs that led to it (each
earlier run up to the step the next one started from). A run that starts from an older
checkpoint (a rollback) starts a new branch, and HEAD.json names it, so `--resume auto`
continues that branch, not the abandoned later steps.

HEAD.json is read like everything else in a checkpoint root: as untrusted input. It must be an
object with the run id, a non-empty lineage of {run, until} entries, and `from` (the checkpoint
the run started from, null for a fresh start) as a string or null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from arflow.checkpoint.layout import MAX_STEP, CheckpointError, Found


def in_lineage(meta: dict, lineage: list[dict]) -> bool:
    """Whether the checkpoint of `meta` lies on `lineage` (written by one of its runs, before
    the step the next run of the lineage started from)."""
    run, step = meta.get("run_id"), meta.get("step")
    return any(e["run"] == run and ("until" not in e or step <= e["until"]) for e in lineage)


def continued_lineage(start: Found | None, run_id: str) -> list[dict]:
    """The lineage of a run starting from `start` (None: a fresh run)."""
    if start is None:
        return [{"run": run_id}]
    parent = [dict(e) for e in start.meta["lineage"]]
    parent[-1]["until"] = start.step
    return [*parent, {"run": run_id}]


@dataclass(frozen=True)
class Head:
    run: str
    lineage: list[dict]
    start: str | None  # the URL of the checkpoint the run started from

    def to_json(self, started_at: float) -> bytes:
        record = {
            "run": self.run,
            "lineage": self.lineage,
            "from": self.start,
            "started_at": started_at,
        }
        return json.dumps(record, indent=2).encode()


def parse_head(raw: bytes, url: str) -> Head:
    """HEAD.json's content, validated; anything else raises CheckpointError naming it."""
    try:
        head = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{url} is corrupt (not JSON: {err})") from None
    problem = None
    if not isinstance(head, dict):
        problem = f"a JSON {type(head).__name__}, not an object"
    elif not isinstance(head.get("run"), str):
        problem = "no run id"
    elif not (isinstance(head.get("lineage"), list) and head["lineage"]) or any(
        not isinstance(e, dict)
        or not isinstance(e.get("run"), str)
        or ("until" in e and not (type(e["until"]) is int and 0 <= e["until"] <= MAX_STEP))
        for e in head["lineage"]
    ):
        problem = "lineage is not a non-empty list of {run, until} entries"
    elif head.get("from") is not None and not isinstance(head["from"], str):
        problem = "'from' is neither a checkpoint URL nor null"
    if problem:
        raise CheckpointError(f"{url} is corrupt ({problem})")
    return Head(head["run"], head["lineage"], head.get("from"))
