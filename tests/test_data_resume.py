"""Exact resume with the same layout; exactly-once remainder of the epoch after a layout change."""

from __future__ import annotations

import io
import json

import pytest
import torch

from arflow.data import SequenceLoader

ARGS = dict(seq_len=5, batch_size=4, num_workers=2, world_size=2, return_meta=True)


def loader(url, **overrides):
    return SequenceLoader(url, **{**ARGS, **overrides})


def same(a, b) -> bool:
    return (
        torch.equal(a[0], b[0])
        and torch.equal(a[1], b[1])
        and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_restored_loader_yields_the_next_50_batches(digits_shards, rank):
    original = loader(digits_shards, rank=rank)
    it = iter(original)
    for _ in range(20):
        next(it)
    state = original.state_dict()
    expected = [next(it) for _ in range(50)]  # crosses into epoch 1 (epoch_length is 43)
    assert {int(e) for batch in expected for e in batch[2]["epoch"]} == {0, 1}

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = loader(digits_shards, rank=rank)
    restored.load_state_dict(torch.load(buffer))
    resumed = iter(restored)
    assert all(same(e, next(resumed)) for e in expected)
    assert json.loads(json.dumps(state)) == state  # plain values, small
    assert len(json.dumps(state)) < 1000


def test_a_rank_can_resume_from_another_ranks_state(digits_shards):
    rank0, rank1 = loader(digits_shards, rank=0), loader(digits_shards, rank=1)
    it0, it1 = iter(rank0), iter(rank1)
    for _ in range(30):
        next(it0), next(it1)
    expected = [next(it1) for _ in range(10)]
    restored = loader(digits_shards, rank=1)
    restored.load_state_dict(rank0.state_dict())
    resumed = iter(restored)
    assert all(same(e, next(resumed)) for e in expected)


def test_state_from_different_plan_is_refused(digits_shards):
    state = loader(digits_shards).state_dict()
    with pytest.raises(ValueError, match="seed=0 \\(now 3\\)"):
        loader(digits_shards, seed=3).load_state_dict(state)


def emitted(loaders, consumed: int | None):
    """(epoch, sample ids) -> x of every sequence the loaders emit: ``consumed`` batches per rank, or
    (None) until every stream of every rank has moved past epoch 1."""
    out = {}
    for ld in loaders:
        it = iter(ld)
        for step in range(10**6):
            if consumed is not None and step == consumed:
                break
            x, _, meta = next(it)
            if consumed is None and (meta["epoch"] >= 2).all():
                break
            for row, ids in enumerate(meta["sample_ids"].tolist()):
                key = (int(meta["epoch"][row]), tuple(ids))
                assert key not in out, f"sequence {key} emitted twice"
                out[key] = x[row]
    return out


@pytest.mark.parametrize(
    "consumed", [12, 45]
)  # inside epoch 0; with some streams already in epoch 1
def test_changed_world_size_emits_the_rest_of_the_epoch_exactly_once(digits_shards, consumed):
    kwargs = dict(class_sampling="proportional")
    old = [loader(digits_shards, rank=r, **kwargs) for r in range(2)]
    before = emitted(old, consumed)
    assert any(epoch == 1 for epoch, _ in before) == (consumed == 45)
    new = [
        loader(digits_shards, rank=r, world_size=3, num_workers=1, batch_size=3, **kwargs)
        for r in range(3)
    ]
    for ld in new:
        ld.load_state_dict(old[0].state_dict())
    after = emitted(new, None)
    assert not before.keys() & after.keys()
    # The content of an epoch does not depend on the layout: compare with one uninterrupted stream.
    reference = emitted(
        [
            SequenceLoader(
                digits_shards, seq_len=5, batch_size=8, num_workers=0, return_meta=True, **kwargs
            )
        ],
        None,
    )
    combined = {**before, **after}
    for epoch in (0, 1):
        assert {k for k in combined if k[0] == epoch} == {k for k in reference if k[0] == epoch}
    assert all(torch.equal(combined[k], reference[k]) for k in reference if k[0] <= 1)


def test_latent_batches_resume_bit_identically_with_workers(tmp_path):
    # Latent noise is drawn in the workers from a generator keyed by the sequence, so a resumed
    # loader draws the same noise although its workers restart.
    from arflow.data.writing.synthetic import write_synthetic_latents

    url = str(tmp_path / "latents")
    write_synthetic_latents(url, classes=3, per_class=40, per_shard=20, side=4)
    args = dict(seq_len=3, batch_size=4, num_workers=2, world_size=1, return_meta=True)
    original = SequenceLoader(url, **args)
    it = iter(original)
    for _ in range(7):
        next(it)
    state = original.state_dict()
    expected = [next(it) for _ in range(12)]
    restored = SequenceLoader(url, **args)
    restored.load_state_dict(state)
    resumed = iter(restored)
    assert all(same(e, next(resumed)) for e in expected)
    assert expected[0][0].shape == (4, 3, 4, 4, 4) and expected[0][0].std() > 0.1


def plain(value) -> bool:
    """Only what torch.load(weights_only=True) and JSON accept without custom classes."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return type(value) in (int, float, str, bool, type(None))


def test_state_is_plain_values_after_every_kind_of_load(digits_shards):
    from arflow.utils.synthetic import SyntheticLoader

    old = loader(digits_shards, rank=1, class_sampling="proportional")
    it = iter(old)
    for _ in range(45):  # some streams already in epoch 1
        next(it)
    resharded = loader(
        digits_shards, world_size=3, num_workers=1, batch_size=3, class_sampling="proportional"
    )
    resharded.load_state_dict(old.state_dict())  # re-planned remainder: recomputed positions
    next(iter(resharded))
    synthetic = SyntheticLoader(sample_shape=(3, 8, 8), num_classes=10, seq_len=5, batch_size=2)
    for state in (old.state_dict(), resharded.state_dict(), synthetic.state_dict()):
        assert plain(state), state
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        assert torch.load(buffer, weights_only=True) == state
