"""Host copies for background checkpoints: independent of the originals, reused buffers from one
save to the next, DTensor shards kept as shards of the same global tensor."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from arflow.distributed.staging import HostStager


def test_copies_are_independent_and_buffers_are_reused():
    stager = HostStager()
    state = {"w": torch.arange(6.0).view(2, 3), "opt": [{"step": 3, "m": torch.ones(4)}], "n": "x"}
    first = stager(state, "a")
    assert first["opt"][0]["step"] == 3 and first["n"] == "x"
    state["w"].add_(100)  # training goes on changing the originals
    state["opt"][0]["m"].zero_()
    assert torch.equal(first["w"], torch.arange(6.0).view(2, 3))
    assert torch.equal(first["opt"][0]["m"], torch.ones(4))
    second = stager(state, "a")
    assert second["w"].data_ptr() == first["w"].data_ptr()  # the same host buffer, refreshed
    assert torch.equal(second["w"], state["w"]) and second["w"] is not state["w"]
    other = stager({"w": torch.zeros(5)}, "a")  # another layout under the same key: new buffer
    assert other["w"].shape == (5,) and other["w"].data_ptr() != first["w"].data_ptr()


def test_a_dtensor_stays_the_same_shard(process_group):
    mesh = init_device_mesh("cpu", (1,))
    full = torch.randn(4, 6)
    sharded = distribute_tensor(full, mesh, [Shard(0)])
    copy = HostStager()({"p": sharded}, "dcp")["p"]
    assert isinstance(copy, DTensor) and copy.placements == sharded.placements
    assert copy.shape == full.shape and torch.equal(copy.full_tensor(), full)
    assert copy.to_local().data_ptr() != sharded.to_local().data_ptr()


def test_structure_and_library_types_are_kept():
    state = {
        "shapes": {"w": torch.Size([2, 3])},
        "pair": (torch.ones(1), 2),
        "list": [torch.zeros(1)],
    }
    copy = HostStager()(state, "x")
    assert type(copy["shapes"]["w"]) is torch.Size and copy["shapes"]["w"] == torch.Size([2, 3])
    assert type(copy["pair"]) is tuple and copy["pair"][1] == 2
    assert type(copy["list"]) is list and torch.equal(copy["list"][0], torch.zeros(1))
