"""Manifest validation and the loader's refusals: every error names the manifest, class or shard."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from arflow.data import (
    Manifest,
    ManifestError,
    RetryPolicy,
    SequenceLoader,
    ShardInfo,
    StorageError,
    load_manifest,
)
from arflow.data.manifest import ShardTable, manifest_from_dict


@pytest.fixture
def copy(digits_shards, tmp_path):
    """A private copy of the digits shard set and its parsed manifest.json."""
    root = tmp_path / "digits"
    shutil.copytree(digits_shards, root)
    return root, json.loads((root / "manifest.json").read_text())


def rewrite(root, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip(digits_shards):
    manifest = load_manifest(digits_shards)
    assert (
        manifest.num_classes == 10
        and sum(manifest.counts) == 1797
        and manifest.sample_shape == (3, 8, 8)
    )
    assert manifest.encoding == "pixels" and manifest.version == 1
    assert manifest_from_dict(manifest.to_dict(), manifest.url) == manifest
    assert load_manifest(manifest.url) == manifest  # the root or manifest.json itself


def test_shards_are_columns_with_shard_info_on_access(digits_shards):
    manifest = load_manifest(digits_shards)
    table, raw = manifest.shards, json.loads(Path(manifest.url).read_text())
    assert isinstance(table, ShardTable) and len(table) == len(raw["shards"]) == 65
    assert table.counts.dtype == np.int64 and not table.counts.flags.writeable
    for i in (0, 17, -1):
        entry, info = raw["shards"][i], table[i]
        assert info == ShardInfo(
            f"{digits_shards}/{entry['path']}",
            entry["path"],
            entry["class_id"],
            entry["count"],
            entry["bytes"],
            entry["sha256"],
        )
    assert table[3:6] == [table[3], table[4], table[5]] and list(table)[-1] == table[-1]
    # a manifest built from ShardInfo (as make_shards builds it) holds the same table
    rebuilt = Manifest(**{**vars(manifest), "shards": list(table)})
    assert rebuilt == manifest and rebuilt.shards == table
    # the per-class shard lists written back are the manifest's own
    assert manifest.to_dict()["classes"] == raw["classes"]
    # loader states saved before the table existed name the shard set by the same fingerprint
    text = "\n".join(f"{s.path} {s.class_id} {s.count} {s.sha256}" for s in table)
    assert manifest.fingerprint() == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_missing_manifest_names_the_url(tmp_path):
    with pytest.raises(ManifestError, match=f"manifest not found: {tmp_path}/manifest.json"):
        load_manifest(str(tmp_path))


def test_invalid_json_names_the_url(copy):
    root, _ = copy
    (root / "manifest.json").write_text('{"format": "arflow-class-shards", ')
    with pytest.raises(ManifestError, match=f"{root}/manifest.json is not valid JSON"):
        load_manifest(str(root))


def test_unknown_version(copy):
    root, manifest = copy
    rewrite(root, {**manifest, "version": 99})
    with pytest.raises(ManifestError, match=f"{root}/manifest.json: unknown format version 99"):
        SequenceLoader(str(root), seq_len=5, batch_size=4, num_workers=0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("shards"), "missing field 'shards'"),
        (
            lambda m: m["shards"][3].update(sha256="abc"),
            r"shards\[3\].sha256 'abc' is not a sha256",
        ),
        (
            lambda m: m["classes"][2].update(count=5),
            "class '2' \\(id 2\\) claims 5 samples but its shards hold 177",
        ),
        (lambda m: m.update(encoding="jpeg"), "unknown encoding 'jpeg'"),
        (lambda m: m.update(format="something-else"), "not an ARFlow shard manifest"),
    ],
)
def test_malformed_manifest_names_the_field(copy, edit, message):
    root, manifest = copy
    edit(manifest)
    rewrite(root, manifest)
    with pytest.raises(ManifestError, match=message):
        load_manifest(str(root))


def test_class_smaller_than_seq_len_is_named_or_dropped(copy):
    root, manifest = copy
    # keep only the first shard of class 4 (26 samples; other shards hold 26 to 30)
    first = next(s for s in manifest["shards"] if s["class_id"] == 4)
    manifest["shards"] = [s for s in manifest["shards"] if s["class_id"] != 4 or s is first]
    manifest["classes"][4]["count"] = first["count"]
    rewrite(root, manifest)
    with pytest.raises(
        ManifestError,
        match=f"class '4' \\(id 4, {first['count']} samples\\) has fewer than seq_len=40",
    ):
        SequenceLoader(str(root), seq_len=40, batch_size=2, num_workers=0)
    with pytest.warns(
        UserWarning, match=f"dropping 1 classes .*'4' \\(id 4, {first['count']} samples\\)"
    ):
        loader = SequenceLoader(
            str(root),
            seq_len=20,
            batch_size=2,
            num_workers=0,
            min_per_class=first["count"] + 1,
            class_sampling="proportional",
        )
    it = iter(loader)
    labels = {int(label) for _ in range(60) for label in next(it)[1]}
    assert 4 not in labels and len(labels) == 9


def test_shard_smaller_than_seq_len_is_named(digits_shards):
    with pytest.raises(
        ManifestError,
        match="shard .*c00000_0000.tar of class '0' holds 30 samples, fewer than seq_len=31",
    ):
        SequenceLoader(digits_shards, seq_len=31, batch_size=2, num_workers=0)


def test_consumer_expectations_name_both_sides(digits_shards):
    with pytest.raises(
        ManifestError,
        match=r"sample shape \[3, 8, 8\] but the consumer asked for \[4, 32, 32\] and "
        r"encoding 'pixels' but the consumer asked for 'vae'",
    ):
        SequenceLoader(
            digits_shards,
            seq_len=5,
            batch_size=4,
            num_workers=0,
            expect_shape=(4, 32, 32),
            expect_encoding="vae",
        )


def test_too_many_streams_for_the_shards(digits_shards):
    with pytest.raises(
        ManifestError, match="65 shards give sequences, fewer than .* 80 data streams"
    ):
        SequenceLoader(digits_shards, seq_len=5, batch_size=8, num_workers=8, world_size=10)


def test_unreachable_endpoint_fails_fast_naming_the_url(aws_env):
    with socket.socket() as closed:  # bound but not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(
            StorageError, match="s3://nowhere/data/manifest.json: gave up after 2 attempts"
        ):
            load_manifest(
                "s3://nowhere/data",
                {"client_kwargs": {"endpoint_url": endpoint}},
                retry=RetryPolicy(attempts=2, base_delay=0.1),
            )
    assert time.monotonic() - started < 30


def test_silent_endpoint_times_out_naming_the_url(aws_env):
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        options = {
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}"},
            "config_kwargs": {"read_timeout": 0.3, "connect_timeout": 0.3},
        }
        started = time.monotonic()
        with pytest.raises(
            StorageError, match="s3://silent/manifest.json: gave up after 1 attempts"
        ):
            load_manifest("s3://silent/manifest.json", options, retry=RetryPolicy(attempts=1))
        assert time.monotonic() - started < 30


def test_wrong_credentials_fail_naming_the_url(moto_server_factory):
    endpoint = moto_server_factory(
        {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    )  # this server checks credentials
    started = time.monotonic()
    with pytest.raises(
        StorageError, match="s3://private/data/manifest.json: access denied .*credentials"
    ):
        SequenceLoader(
            "s3://private/data",
            seq_len=5,
            batch_size=4,
            num_workers=0,
            storage_options={"client_kwargs": {"endpoint_url": endpoint}},
        )
    assert time.monotonic() - started < 30
