"""Fetching a checkpoint to where a rank can read it, and checking every file its meta.json
lists before anything is loaded.

Only the files meta.json lists are fetched (remote) or read (local), each at most its recorded
size, each a regular file inside the step directory (arflow.storage.hashing.verify_file).
"""

from __future__ import annotations

import tempfile

from arflow.checkpoint.layout import Found
from arflow.distributed.collectives import all_gather, gather_errors
from arflow.distributed.env import DistInfo
from arflow.storage.hashing import verify_files


def fetch(found: Found) -> None:
    """Make `found` readable on this rank: a local step directory as it is; a remote one's
    listed files downloaded into a temporary directory (per rank), deleted by
    `found.release()`. A listed object that is missing or of another size than recorded is not
    downloaded (verification names it)."""
    if found.local is not None:
        return
    store = found.store
    if store.local:
        found.local, found.shared = store.path(found.name), True
        return
    files = found.meta["files"]
    sizes = store.sizes(found.name)
    wanted = [n for n in sorted(files) if sizes.get(n) == files[n]["size"]]
    local = tempfile.mkdtemp(prefix="arflow-resume-")
    found.local, found.shared, found._download = local, False, local
    try:
        store.download(found.name, wanted, local)
    except BaseException:
        found.release()
        raise


def verify(found: Found, info: DistInfo | None = None) -> list[str]:
    """Fetch `found` and check every file meta.json lists (collective when `info` is given:
    ranks share the work on a shared directory). Returns the problems, [] when intact."""
    error = None
    try:
        fetch(found)
    except OSError as err:
        error = f"cannot download: {err}"
    errors = gather_errors(info, error)
    if errors:
        return errors
    files = found.meta["files"]
    names = sorted(files)
    if found.shared and info is not None and info.world_size > 1:
        names = names[info.rank :: info.world_size]
    problems = verify_files(found.local, files, only=names)
    return sorted({p for ps in all_gather(info, problems) for p in ps})
