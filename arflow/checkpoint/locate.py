"""Read-only lookup of checkpoints, the one rule for "which checkpoint" used by resume,
conversion, sampling and evaluation alike.

    root = CheckpointRoot("s3://bucket/run/checkpoints", storage_options)
    root.resume_candidates()   # what `--resume auto` tries, newest first
    find_checkpoint(url)       # a step directory, or the first of a root's resume candidates

Nothing here writes. Step directories count only with a valid meta.json (layout.parse_meta);
moved-aside `step_X.abandoned-<run>` directories never match a step name, so no lookup returns
an abandoned branch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from arflow.checkpoint.layout import (
    HEAD,
    MAX_META_BYTES,
    META,
    CheckpointDirInUse,
    CheckpointError,
    Found,
    parse_meta,
    step_dir_name,
    step_of,
)
from arflow.checkpoint.lineage import Head, in_lineage, parse_head
from arflow.models.pretrained import EMA_FILE, resolve_weights
from arflow.storage import RetryPolicy, Store

Report = Callable[[str], None]

CHOICES = (
    "Pass --resume PATH to start from one of them, --overwrite to delete them and start afresh, "
    "or choose another checkpoint.dir."
)


def _print(message: str) -> None:
    print(message, flush=True)


class CheckpointRoot:
    """A checkpoint root (local path or URL), read only."""

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        retry: RetryPolicy = RetryPolicy(),
        store: Store | None = None,
    ):
        self.store = store or Store(url, storage_options, retry)
        self.url = self.store.url
        self._metas: dict[int, dict] = {}

    def step_dirs(self) -> dict[int, str]:
        """Step -> directory name of every step directory, complete or not."""
        return {s: name for name in self.store.children() if (s := step_of(name)) is not None}

    def complete_steps(self) -> list[int]:
        return sorted(
            s for s, name in self.step_dirs().items() if self.store.exists(f"{name}/{META}")
        )

    def meta(self, step: int) -> dict:
        """The validated meta.json of a step directory (CheckpointError when damaged)."""
        if step not in self._metas:
            name = step_dir_name(step)
            try:
                raw = self.store.read(f"{name}/{META}", limit=MAX_META_BYTES)
            except ValueError as err:
                raise CheckpointError(f"{self.store.url_of(name)}/{META}: {err}") from None
            self._metas[step] = parse_meta(raw, self.store.url_of(name), step)
        return self._metas[step]

    def forget(self, step: int) -> None:
        self._metas.pop(step, None)

    def remember(self, step: int, meta: dict) -> None:
        self._metas[step] = meta

    def found(self, step: int) -> Found:
        return Found(step, self.store, step_dir_name(step), self.meta(step))

    def head(self) -> Head | None:
        if not self.store.exists(HEAD):
            return None
        try:
            raw = self.store.read(HEAD, limit=MAX_META_BYTES)
        except ValueError as err:
            raise CheckpointError(f"{self.store.url_of(HEAD)}: {err}") from None
        return parse_head(raw, self.store.url_of(HEAD))

    def intact_metas(self, report: Report = _print) -> dict[int, dict]:
        """Step -> meta.json of every complete checkpoint; damaged meta.json files reported and
        left out."""
        out = {}
        for step in self.complete_steps():
            try:
                out[step] = self.meta(step)
            except CheckpointError as err:
                report(f"CHECKPOINT SKIPPED: {err}")
        return out

    def resume_candidates(self, report: Report = _print) -> list[Found]:
        """What `--resume auto` tries, newest first: the checkpoints of the lineage HEAD.json
        names (the newest run's own, then the one it started from and its ancestors); every
        complete checkpoint when there is no HEAD.json. [] means a fresh start is safe: the
        root holds no complete checkpoint. A HEAD.json that is unreadable, or names a lineage
        none of the complete checkpoints belongs to, is refused (CheckpointDirInUse): guessing
        would silently train from step 0 beside them or continue another branch."""
        complete = self.complete_steps()
        try:
            head = self.head()
        except CheckpointError as err:
            raise CheckpointDirInUse(
                f"{err}; `--resume auto` cannot tell which checkpoints of {self.url} to continue "
                f"(steps {_steps(complete)}). {CHOICES}"
            ) from None
        metas = self.intact_metas(report)
        if head is None:
            return [self.found(s) for s in sorted(metas, reverse=True)]
        out = [
            self.found(s) for s in sorted(metas, reverse=True) if in_lineage(metas[s], head.lineage)
        ]
        start = self._inside(head.start)
        if start is not None and start not in {f.step for f in out} and start in metas:
            out.append(self.found(start))
        if out:
            return sorted(out, key=lambda f: f.step, reverse=True)
        if complete:
            raise CheckpointDirInUse(
                f"checkpoint.dir {self.url} holds complete checkpoints (steps {_steps(complete)}) "
                f"but none of the lineage its {HEAD} names (run {head.run}); `--resume auto` will "
                f"not guess. {CHOICES}"
            )
        if head.start is not None and start is None:
            raise CheckpointDirInUse(
                f"{self.store.url_of(HEAD)} says the run started from {head.start}, outside "
                f"checkpoint.dir, and saved nothing here yet: pass --resume {head.start} to start "
                f"from it again, or --overwrite to start afresh."
            )
        return []

    def _inside(self, url: str | None) -> int | None:
        """The step of `url` when it names a step directory directly inside this root."""
        prefix = self.store.url_of("") + "/"
        if url is None or not url.startswith(prefix):
            return None
        return step_of(url[len(prefix) :].rstrip("/"))


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def step_directory(url: str, storage_options: dict | None, retry: RetryPolicy) -> Found | None:
    """The checkpoint at `url` when it is a complete step directory, else None."""
    store = Store(url, storage_options, retry)
    if not store.exists(META):
        return None
    try:
        raw = store.read(META, limit=MAX_META_BYTES)
    except ValueError as err:
        raise CheckpointError(f"{store.url_of(META)}: {err}") from None
    parent_url, _, name = store.url.rpartition("/")
    meta = parse_meta(raw, store.url, step_of(name))
    return Found(meta["step"], Store(parent_url or ".", storage_options, retry), name, meta)


def explicit_candidates(
    url: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
) -> list[Found]:
    """`--resume URL`: the step directory it names, or what `--resume auto` would try there."""
    found = step_directory(url, storage_options, retry)
    if found is not None:
        return [found]
    root = CheckpointRoot(url, storage_options, retry)
    if not root.store.exists():
        raise FileNotFoundError(f"checkpoint {url} does not exist")
    candidates = root.resume_candidates()
    if not candidates:
        raise FileNotFoundError(f"no complete checkpoint at {url} (a step_* directory with {META})")
    return candidates


def find_checkpoint(
    url: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
) -> Found:
    """A complete checkpoint given as its step directory, or as a checkpoint root (the newest
    of the checkpoints `--resume auto` would take there). Not fetched yet."""
    return explicit_candidates(url, storage_options, retry)[0]


def weights_file(path: str | Path) -> Path:
    """What `arflow.models.load_pretrained` should read for a local path, by the same rule as
    resume: a weight file, a Hub folder, a run or step directory as they are
    (`resolve_weights`); a checkpoint root: the EMA weights of the checkpoint `--resume auto`
    would take there (its lineage's newest, never a moved-aside abandoned branch)."""
    path = Path(path)
    try:
        return resolve_weights(path)
    except FileNotFoundError:
        if not path.is_dir():
            raise
    try:
        found = find_checkpoint(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} holds no weights: expected a .safetensors file, a Hub folder, a run or "
            f"checkpoint step directory with {EMA_FILE}, or a checkpoint root with complete "
            f"step directories"
        ) from None
    return Path(found.store.path(found.name)) / EMA_FILE
