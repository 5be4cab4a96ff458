"""The dataset manifest: ``manifest.json`` at the root of a class-bucketed shard set.

Format (version 1)::

    {
      "format": "arflow-class-shards", "version": 1,
      "encoding": "pixels" | "vae",
      "sample_shape": [C, H, W],        # one image as the loader yields it
      "stored": {"dtype": "uint8", "shape": [C, H, W]},          # the .npy member of a sample
                # vae: {"dtype": "float32", "shape": [2, 2C, H, W]}: [original, h-flipped] x [mean; logvar]
      "scaling_factor": null | 0.18215, # latents are multiplied by it (vae only)
      "image_size": 256, "source": "...",
      "classes": [{"id": 0, "name": "n01440764", "count": 1300, "shards": ["shards/c00000_0000.tar"]}],
      "shards": [{"path": "shards/c00000_0000.tar", "class_id": 0, "count": 1300,
                  "bytes": 85248000, "sha256": "..."}],
      "dropped_classes": [{"name": "...", "count": 3}]
    }

Shard paths are relative to the directory holding the manifest, so a shard set can be copied or
mirrored as a whole. Every shard holds samples of one class only.

In memory the shards are columns (:class:`ShardTable`: numpy arrays of class ids, counts and
sizes, tuples of paths and checksums), not one Python object per shard: an ImageNet-21k shard set
(21,841 classes, 10^4-10^5 shards) parses in well under a second into a few MB, and a forked
DataLoader worker shares those pages instead of copying every object the garbage collector visits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from arflow.data.errors import ManifestError
from arflow.storage import RetryPolicy, join_url, parent_url, read_bytes

FORMAT = "arflow-class-shards"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
ENCODINGS = ("pixels", "vae")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute URL, resolved against the manifest's directory
    path: str  # as stored in the manifest, relative to the dataset root
    class_id: int
    count: int  # samples in the shard
    bytes: int
    sha256: str


@dataclass(frozen=True, eq=False)
class ShardTable(Sequence):
    """The shards of a manifest as columns, in manifest order; ``table[i]`` is a :class:`ShardInfo`
    (built on access), a slice a list of them. Arrays are read-only int64 of shape (S,)."""

    root: str  # the shard set's root URL, which the paths are relative to
    paths: tuple[str, ...]
    class_ids: np.ndarray
    counts: np.ndarray
    sizes: np.ndarray  # bytes
    sha256: tuple[str, ...]

    def __post_init__(self):
        for name in ("class_ids", "counts", "sizes"):
            array = np.array(getattr(self, name), dtype=np.int64)
            array.flags.writeable = False
            object.__setattr__(self, name, array)

    @classmethod
    def from_infos(cls, root: str, shards: Sequence[ShardInfo]) -> ShardTable:
        return cls(
            root,
            tuple(s.path for s in shards),
            [s.class_id for s in shards],
            [s.count for s in shards],
            [s.bytes for s in shards],
            tuple(s.sha256 for s in shards),
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        path = self.paths[index]  # IndexError for an index out of range
        return ShardInfo(
            join_url(self.root, path),
            path,
            int(self.class_ids[index]),
            int(self.counts[index]),
            int(self.sizes[index]),
            self.sha256[index],
        )

    def __iter__(self) -> Iterator[ShardInfo]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, ShardTable):
            return NotImplemented
        return (self.root, self.paths, self.sha256) == (
            other.root,
            other.paths,
            other.sha256,
        ) and all(
            np.array_equal(getattr(self, k), getattr(other, k))
            for k in ("class_ids", "counts", "sizes")
        )

    __hash__ = None  # mutable-looking contents: not hashable, as a list of ShardInfo is not

    @functools.cached_property
    def fingerprint(self) -> str:
        """See :meth:`Manifest.fingerprint`; computed once."""
        text = "\n".join(
            f"{path} {c} {n} {sha}"
            for path, c, n, sha in zip(
                self.paths, self.class_ids.tolist(), self.counts.tolist(), self.sha256
            )
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest. ``shards`` may be given as a list of :class:`ShardInfo` (their paths
    relative to the manifest's directory); it is stored as a :class:`ShardTable`."""

    url: str  # of manifest.json
    version: int
    class_names: list[str]
    counts: list[int]  # samples per class id
    sample_shape: tuple[int, int, int]  # (C, H, W) of one yielded image
    encoding: str  # "pixels" | "vae"
    stored_dtype: str
    stored_shape: tuple[int, ...]
    scaling_factor: float | None
    shards: ShardTable
    image_size: int | None = None
    source: str | None = None
    dropped_classes: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.shards, ShardTable):
            object.__setattr__(self, "shards", ShardTable.from_infos(self.root, self.shards))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def root(self) -> str:
        return parent_url(self.url)

    def fingerprint(self) -> str:
        """Identifies the shard set (paths, counts, checksums), to refuse a loader state from another."""
        return self.shards.fingerprint

    def to_dict(self) -> dict:
        t = self.shards
        per_class: list[list[str]] = [[] for _ in self.class_names]
        for path, c in zip(t.paths, t.class_ids.tolist()):
            per_class[c].append(path)
        return {
            "format": FORMAT,
            "version": self.version,
            "encoding": self.encoding,
            "sample_shape": list(self.sample_shape),
            "stored": {"dtype": self.stored_dtype, "shape": list(self.stored_shape)},
            "scaling_factor": self.scaling_factor,
            "image_size": self.image_size,
            "source": self.source,
            "classes": [
                {"id": c, "name": name, "count": self.counts[c], "shards": per_class[c]}
                for c, name in enumerate(self.class_names)
            ],
            "shards": [
                {"path": path, "class_id": c, "count": n, "bytes": size, "sha256": sha}
                for path, c, n, size, sha in zip(
                    t.paths, t.class_ids.tolist(), t.counts.tolist(), t.sizes.tolist(), t.sha256
                )
            ],
            "dropped_classes": self.dropped_classes,
        }


def manifest_url(url: str) -> str:
    """Accept a dataset root or the manifest itself."""
    return url if url.endswith(".json") else join_url(url, MANIFEST_NAME)


def load_manifest(
    url: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
) -> Manifest:
    """Read and validate a manifest. ``url``: the dataset root or its ``manifest.json`` (any fsspec URL)."""
    return parse_manifest(read_manifest(url, storage_options, retry), manifest_url(url))


def read_manifest(
    url: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()
) -> bytes:
    """The bytes of the manifest of ``url`` (the dataset root or its manifest.json): one request."""
    url = manifest_url(url)
    try:
        return read_bytes(url, storage_options, retry)
    except FileNotFoundError:
        raise ManifestError(
            f"manifest not found: {url} (write one with tools/make_shards.py)"
        ) from None


def parse_manifest(raw: bytes, url: str) -> Manifest:
    """Parse and validate the bytes of the manifest found at ``url``."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {url} is not valid JSON: {exc}") from None
    return manifest_from_dict(data, url)


def manifest_from_dict(data: dict, url: str) -> Manifest:
    """Validate the parsed JSON of a manifest found at ``url``."""

    def fail(message: str) -> ManifestError:
        return ManifestError(f"manifest {url}: {message}")

    def get(obj: dict, key: str, kind, where: str = ""):
        if not isinstance(obj, dict) or key not in obj:
            raise fail(f"missing field {where}{key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise fail(
                f"field {where}{key!r} should be {getattr(kind, '__name__', kind)}, got {value!r}"
            )
        return value

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail(f'not an ARFlow shard manifest (expected "format": {FORMAT!r})')
    version = get(data, "version", int)
    if version not in SUPPORTED_VERSIONS:
        raise fail(
            f"unknown format version {version}; this code reads versions {list(SUPPORTED_VERSIONS)}"
        )
    encoding = get(data, "encoding", str)
    if encoding not in ENCODINGS:
        raise fail(f"unknown encoding {encoding!r}; expected one of {list(ENCODINGS)}")
    sample_shape = tuple(get(data, "sample_shape", list))
    stored = get(data, "stored", dict)
    stored_shape = tuple(get(stored, "shape", list, "stored."))
    stored_dtype = get(stored, "dtype", str, "stored.")
    for name, shape in (("sample_shape", sample_shape), ("stored.shape", stored_shape)):
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise fail(f"field {name!r} should be a list of positive ints, got {list(shape)}")
    if len(sample_shape) != 3:
        raise fail(f"field 'sample_shape' should be [C, H, W], got {list(sample_shape)}")
    scaling = data.get("scaling_factor")
    if encoding == "vae" and not isinstance(scaling, (int, float)):
        raise fail("a vae manifest needs a numeric 'scaling_factor'")

    classes = get(data, "classes", list)
    names, counts = [], []
    for c, entry in enumerate(classes):
        if get(entry, "id", int, f"classes[{c}].") != c:
            raise fail(
                f"classes[{c}] has id {entry['id']}; ids must be 0..{len(classes) - 1} in order"
            )
        names.append(get(entry, "name", str, f"classes[{c}]."))
        counts.append(get(entry, "count", int, f"classes[{c}]."))
    if not names:
        raise fail("no classes")

    paths, class_ids, shard_counts, sizes, digests = [], [], [], [], []
    for i, entry in enumerate(get(data, "shards", list)):
        where = f"shards[{i}]."
        paths.append(get(entry, "path", str, where))
        class_id = get(entry, "class_id", int, where)
        if not 0 <= class_id < len(names):
            raise fail(f"{where}class_id {class_id} is not a class id")
        class_ids.append(class_id)
        shard_counts.append(get(entry, "count", int, where))
        sha = get(entry, "sha256", str, where)
        if not _SHA256.fullmatch(sha):
            raise fail(f"{where}sha256 {sha!r} is not a sha256 hex digest")
        digests.append(sha)
        sizes.append(get(entry, "bytes", int, where))
    shards = ShardTable(
        parent_url(url), tuple(paths), class_ids, shard_counts, sizes, tuple(digests)
    )
    per_class = np.bincount(shards.class_ids, weights=shards.counts, minlength=len(names))
    wrong = np.flatnonzero(per_class != np.array(counts, dtype=np.float64))
    if len(wrong):
        c = int(wrong[0])
        raise fail(
            f"class {names[c]!r} (id {c}) claims {counts[c]} samples but its shards hold "
            f"{int(per_class[c])}"
        )

    return Manifest(
        url=url,
        version=version,
        class_names=names,
        counts=counts,
        sample_shape=sample_shape,
        encoding=encoding,
        stored_dtype=stored_dtype,
        stored_shape=stored_shape,
        scaling_factor=float(scaling) if scaling is not None else None,
        shards=shards,
        image_size=data.get("image_size"),
        source=data.get("source"),
        dropped_classes=list(data.get("dropped_classes", [])),
    )
