"""The trainer's `data` section reaches the loader: dropping small classes, the bad-sample budget
and its count, and the storage timeouts (a silent S3 endpoint fails within about a minute)."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import socket
import time
import warnings

import pytest
import torch

from arflow.config import ConfigError, config_from_dict
from arflow.data import BadSampleWarning, ManifestError, ShardError, StorageError, load_manifest
from arflow.distributed.env import DistInfo
from arflow.train import build_loader

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
DIGITS_MODEL = {"name": "ARFlow-S/2", "input_size": 8, "in_channels": 3, "num_classes": 10}


def config(**data):
    cfg = config_from_dict({"data": data, "model": DIGITS_MODEL, "train": {"micro_batch_size": 4}})
    cfg.train.global_batch_size = 4
    return cfg.validate(1)


@pytest.fixture
def digits_copy(digits_shards, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(digits_shards, root)
    return root


def test_small_classes_are_dropped_by_data_min_per_class_which_the_error_names(digits_copy):
    manifest = json.loads((digits_copy / "manifest.json").read_text())
    # class 4 as if it held 3 samples (one shard; never read: the class is refused or dropped)
    first = next(s for s in manifest["shards"] if s["class_id"] == 4)
    manifest["shards"] = [s for s in manifest["shards"] if s["class_id"] != 4 or s is first]
    first["count"] = manifest["classes"][4]["count"] = 3
    (digits_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ManifestError, match="set min_per_class \\(data.min_per_class in a training"
    ):
        build_loader(config(url=str(digits_copy), num_workers=0), CPU)
    with pytest.warns(UserWarning, match="dropping 1 classes"):
        loader = build_loader(config(url=str(digits_copy), num_workers=0, min_per_class=5), CPU)
    labels = {int(label) for _, (_, y) in zip(range(60), loader) for label in y}
    assert 4 not in labels and len(labels) == 9
    with pytest.raises(ConfigError, match="data.min_per_class: must be null or >= data.seq_len"):
        config(url=str(digits_copy), min_per_class=3)


def test_bad_sample_budget_comes_from_the_config_and_the_count_from_the_loader(digits_copy):
    shard = load_manifest(str(digits_copy)).shards[3]
    with open(shard.url, "r+b") as f:  # the first sample's .npy magic (after two 512-byte headers)
        f.seek(3 * 512)
        f.write(b"garbage")
    strict = build_loader(config(url=str(digits_copy), num_workers=2, max_bad_samples=0), CPU)
    with (
        pytest.raises(ShardError, match="exceed max_bad_samples=0"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", BadSampleWarning)
        for _ in zip(range(2 * strict.epoch_length), strict):
            pass
    tolerant = build_loader(config(url=str(digits_copy), num_workers=2), CPU)
    assert tolerant.bad_samples == 0
    for _ in zip(range(2 * tolerant.epoch_length), tolerant):  # (warnings stay in the workers)
        pass
    assert tolerant.bad_samples >= 1 and isinstance(tolerant.bad_samples, int)
    assert tolerant.state_dict()["bad_samples"] and tolerant.max_bad_samples == 100


class SilentEndpoint:
    """An S3 endpoint that accepts connections (the kernel's backlog) and never answers."""

    def __enter__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        return self

    def __exit__(self, *exc):
        self.socket.close()


class Timeline(logging.Handler):
    """Seconds since creation at which each record of the arflow.data logger arrived."""

    def __init__(self):
        super().__init__()
        self.started, self.records = time.monotonic(), []

    def emit(self, record):
        self.records.append((time.monotonic() - self.started, record.getMessage()))

    def __enter__(self):
        logging.getLogger("arflow.storage").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("arflow.storage").removeHandler(self)


def fail_on_silent_endpoint(**data) -> tuple[float, list]:
    # Earlier tests' data loaders, collected now rather than on this test's clock (their workers
    # take seconds to stop).
    gc.collect()
    with SilentEndpoint() as endpoint, Timeline() as timeline:
        options = {"client_kwargs": {"endpoint_url": endpoint.url}}
        cfg = config(url="s3://silent/data", storage_options=options, **data)
        with pytest.raises(StorageError, match="s3://silent/data/manifest.json: gave up after"):
            build_loader(cfg, CPU)
        return time.monotonic() - timeline.started, timeline.records


def test_storage_timeouts_and_attempts_come_from_the_config(aws_env):
    took, records = fail_on_silent_endpoint(storage_read_timeout=0.5, storage_attempts=2)
    assert took < 10
    assert len(records) == 1 and "s3://silent/data/manifest.json: transient" in records[0][1]
    assert records[0][0] < 3  # the first retry is reported as soon as the first attempt fails


@pytest.mark.slow  # about a minute of waiting (no CPU)
def test_default_storage_settings_fail_a_silent_endpoint_within_a_minute(aws_env):
    took, records = fail_on_silent_endpoint()
    assert took < 75, f"gave up after {took:.0f} s"
    assert records and records[0][0] < 15, f"first retry reported after {records[0][0]:.0f} s"


@pytest.mark.slow  # the training launcher in a subprocess
def test_bad_sample_count_reaches_metrics_jsonl(digits_copy, tmp_path):
    from test_distributed import command, run, tiny_config

    manifest = load_manifest(str(digits_copy))
    for shard in manifest.shards:  # every shard's first sample: a .npy with a broken magic
        with open(shard.url, "r+b") as f:
            f.seek(3 * 512)
            f.write(b"garbage")
    cfg = tiny_config(
        tmp_path,
        "ddp",
        model={"in_channels": 3, "num_classes": 10},
        data={"url": str(digits_copy), "seq_len": 5, "num_workers": 1},
        train={"steps": 4, "global_batch_size": 4, "micro_batch_size": 4},
        logging={"every": 2},
        samples={"every": 0},
    )
    run(command("python", 1, cfg))
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    counts = [r["data_bad_samples"] for r in rows if "loss" in r]
    assert len(counts) == 2 and 1 <= counts[0] <= counts[1] <= len(manifest.shards), counts
