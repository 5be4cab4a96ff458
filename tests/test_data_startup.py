"""Start-up at scale: benchmarks/startup.py at a test's size (exactly-once over every stream's plan,
storage requests per rank that do not grow with the shard set), its exactly-once check, and the
vectorised per-class quotas of uniform sampling."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from arflow.data.plan import Layout, PlanConfig, Planner, _class_quotas, split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import startup  # noqa: E402


def test_class_quotas_split_every_class_as_split_does():
    rng = np.random.default_rng(0)
    for _ in range(20):
        classes = np.sort(rng.integers(0, 40, 300))  # some classes span many shards
        counts = rng.integers(5, 2000, 300)
        quotas = _class_quotas(counts, classes, 5)
        quota = max(1, int(counts.sum()) // (len(np.unique(classes)) * 5))
        for c in np.unique(classes):
            shards = np.flatnonzero(classes == c)
            assert quotas[shards].tolist() == split(quota, counts[shards]).tolist()


def synthetic_planner(sampling: str) -> tuple[Planner, Layout]:
    sizes = startup.class_sizes(50, 20_000, seed=1)
    _, classes, counts, _ = startup.shard_layout(sizes, 8 * 2**20)
    planner = Planner(counts, classes, [True] * len(counts), PlanConfig(5, sampling, 0, 64))
    return planner, Layout(3, 2, 8, 4)


@pytest.mark.parametrize("sampling", ["uniform", "proportional"])
def test_exactly_once_check_passes_the_plan_and_catches_a_broken_one(sampling, monkeypatch):
    planner, layout = synthetic_planner(sampling)
    report = startup.check_epoch(planner, layout)
    assert report["exactly_once"] and report["sequences_emitted"] == planner.sequences_per_epoch

    # a deal that loses a shard (stream 0's first): its sequences are never emitted
    deal = Planner.deal

    def lossy(self, *args):
        d = deal(self, *args)
        return d._replace(bounds=d.bounds + np.eye(len(d.bounds), dtype=np.int64)[0])

    monkeypatch.setattr(Planner, "deal", lossy)
    broken = startup.check_epoch(planner, layout)
    assert not broken["exactly_once"] and broken["sequences_emitted_twice_or_lost"] > 0


def test_exactly_once_check_catches_samples_read_twice_and_sequences_without_samples(
    monkeypatch,
):
    planner, layout = synthetic_planner("proportional")
    groups = Planner.groups

    def repeating(self, shard, epoch):  # shard 0's second sequence repeats its first
        g = groups(self, shard, epoch)
        if shard == 0:
            g.members[1] = g.members[0]
        return g

    monkeypatch.setattr(Planner, "groups", repeating)
    report = startup.check_epoch(planner, layout)
    assert report["samples_read_more_than_once"] == 5 and not report["exactly_once"]

    monkeypatch.undo()
    planner.groups_per_shard[0] += 1  # one sequence more than the shard's groups hold
    report = startup.check_epoch(planner, layout)
    assert report["sequences_without_samples"] == 1 and not report["exactly_once"]


@pytest.mark.slow
def test_quick_benchmark_plans_exactly_once_with_requests_independent_of_the_shard_set(capsys):
    small = startup.main(["--quick"])
    assert json.loads(capsys.readouterr().out) == small
    large = startup.main(["--quick", "--classes", "600", "--samples", "120000"])
    capsys.readouterr()
    assert large["dataset"]["shards"] >= 9 * small["dataset"]["shards"]

    layout = small["config"]
    # one GET per shard a worker opens (these shards are smaller than one read-ahead request): the
    # first round's and, when a quarter of it is left, the next round's
    bound = 2 * layout["workers"] * layout["open_shards"]
    for report in (small, large):
        for sampling, check in report["exactly_once"].items():
            assert check["exactly_once"], (sampling, check)
            assert check["streams"] == layout["world_size"] * layout["workers"]
        rank0, *others = report["ranks"]
        pages = math.ceil(report["dataset"]["objects_listed"] / 1000)
        # rank 0: the manifest (HEAD + GET) and one listing of the shard directory, for the world
        assert rank0["requests_at_startup_by_kind"] == {"HEAD": 1, "GET": 1, "LIST": pages}
        # every other rank: nothing before its workers open their first shards
        assert others and all(r["requests_at_startup"] == 0 for r in others)
        for r in report["ranks"]:
            assert 0 < r["requests_to_first_batch"] <= bound, r
            assert set(r["requests_to_first_batch_by_kind"]) == {"GET"}  # sizes from the manifest
            assert len(r["workers"]) == 2 and all(w["sequences"] > 0 for w in r["workers"])
    assert large["dataset"]["objects_listed"] > 1000  # the listing itself is paginated
