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
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from arflow.data.errors import ManifestError
from arflow.storage import RetryPolicy, join_url, parent_url, read_bytes

FORMAT = "arflow-class-shards"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
ENCODINGS = ("pixels", "vae")


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute URL, resolved against the manifest's directory
    path: str  # as stored in the manifest, relative to the dataset root
    class_id: int
    count: int  # samples in the shard
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    url: str  # of manifest.json
    version: int
    class_names: list[str]
    counts: list[int]  # samples per class id
    sample_shape: tuple[int, int, int]  # (C, H, W) of one yielded image
    encoding: str  # "pixels" | "vae"
    stored_dtype: str
    stored_shape: tuple[int, ...]
    scaling_factor: float | None
    shards: list[ShardInfo]
    image_size: int | None = None
    source: str | None = None
    dropped_classes: list[dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def root(self) -> str:
        return parent_url(self.url)

    def fingerprint(self) -> str:
        """Identifies the shard set (paths, counts, checksums), to refuse a loader state from another."""
        text = "\n".join(f"{s.path} {s.class_id} {s.count} {s.sha256}" for s in self.shards)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
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
                {
                    "id": c,
                    "name": name,
                    "count": self.counts[c],
                    "shards": [s.path for s in self.shards if s.class_id == c],
                }
                for c, name in enumerate(self.class_names)
            ],
            "shards": [
                {
                    "path": s.path,
                    "class_id": s.class_id,
                    "count": s.count,
                    "bytes": s.bytes,
                    "sha256": s.sha256,
                }
                for s in self.shards
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
    url = manifest_url(url)
    try:
        raw = read_bytes(url, storage_options, retry)
    except FileNotFoundError:
        raise ManifestError(
            f"manifest not found: {url} (write one with tools/make_shards.py)"
        ) from None
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

    root = parent_url(url)
    shards, per_class = [], [0] * len(names)
    for i, entry in enumerate(get(data, "shards", list)):
        where = f"shards[{i}]."
        path = get(entry, "path", str, where)
        class_id = get(entry, "class_id", int, where)
        if not 0 <= class_id < len(names):
            raise fail(f"{where}class_id {class_id} is not a class id")
        count = get(entry, "count", int, where)
        sha = get(entry, "sha256", str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise fail(f"{where}sha256 {sha!r} is not a sha256 hex digest")
        shards.append(
            ShardInfo(
                join_url(root, path), path, class_id, count, get(entry, "bytes", int, where), sha
            )
        )
        per_class[class_id] += count
    for c, (name, count) in enumerate(zip(names, counts)):
        if per_class[c] != count:
            raise fail(
                f"class {name!r} (id {c}) claims {count} samples but its shards hold {per_class[c]}"
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
