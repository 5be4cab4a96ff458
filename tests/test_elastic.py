"""Elastic restarts under torchrun's elastic agent (`--nnodes 1:2 --max-restarts 3`, c10d
rendezvous on loopback), one worker per agent, real training with background checkpoints.

One test per backend walks the whole scenario of benchmarks/elastic.py: a node is SIGKILLed in the
middle of a checkpoint write, the survivor restarts at world size 1 from the newest committed
checkpoint (resharded), then a new node joins the running job, which continues at world size 2
with rank 0 on the new node, to the end of the run. Recovery times are printed (`pytest -s`);
the README's figures come from the benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_distributed import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from elastic import Scenario  # noqa: E402

STEPS = 30
# Shorter than torchrun's defaults (heartbeat every 5 s, dead after 3 misses; 30 s last call)
# so that a lost node is noticed within seconds: the test pays for start-ups, not for waits.
# Dead after 6 s without a heartbeat: a live agent on a busy machine is never taken for dead.
RDZV_CONF = "last_call_timeout=3,keep_alive_interval=2"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_node_lost_mid_save_then_node_joins(tmp_path, request, backend):
    """FSDP2 on synthetic data; DeepSpeed ZeRO-2 on the digits shards through a data-loader
    worker (the data plan is re-dealt to the new world size at each restart)."""
    data = {}
    if backend == "deepspeed":
        shards = request.getfixturevalue("digits_shards")
        data = dict(
            model={"in_channels": 3, "num_classes": 10},
            data={"url": shards, "num_workers": 1},
        )
    cfg = tiny_config(tmp_path, backend, 2, **data)
    scenario = Scenario(
        tmp_path / "elastic", str(cfg), [], steps=STEPS, every=2, rdzv_conf=RDZV_CONF, timeout=480
    )
    report = scenario.run()
    kill, join, end = report["kill"], report["join"], report["end"]
    print(json.dumps({"backend": backend, "kill": kill, "join": join}))
    sizes = {int(step): world for step, world in end["world_size_by_checkpoint"].items()}

    # The kill: the survivor alone, from the newest committed checkpoint (saved by 2 ranks).
    assert kill["world_size"] == 1
    assert kill["resumed_from"] == kill["newest_committed"]
    assert sizes[kill["resumed_from"]] == 2  # resharded from world size 2
    if kill["resumed_from"] < kill["save_in_flight"]:  # the kill landed in the write: harmless
        assert kill["save_in_flight"] in kill["removed_incomplete"]
    else:  # the save had just committed before the kill took effect
        assert kill["resumed_from"] == kill["save_in_flight"]

    # The join: world size 2 again, rank 0 on the new node, from the step the job stopped at.
    assert join["world_size"] == 2 and join["rank_of_new_node"] == 0
    assert join["resumed_from"] == join["newest_committed"] > kill["resumed_from"]
    assert join["steps_lost"] == 0  # the workers were stopped with SIGTERM: saved, then exited
    assert sizes[join["resumed_from"]] == 1

    # The end: every step logged once (replayed ones moved aside), saved by both ranks, exported.
    assert end["exit_codes"] == {"a": 0, "c": 0}
    assert end["steps_logged"] == list(range(1, STEPS + 1))
    assert sizes[STEPS] == 2 and end["exported"]
    assert all(sizes[s] == 1 for s in sizes if kill["resumed_from"] < s <= join["resumed_from"])
