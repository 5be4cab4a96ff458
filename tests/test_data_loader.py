"""SequenceLoader on local digits shards: sequence validity, class sampling, epochs, bad shards."""

from __future__ import annotations

import io
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from arflow.data import BadSampleWarning, SequenceLoader, ShardError, load_manifest
from arflow.data.shards import tar_members


def stored_samples(url: str) -> dict[int, np.ndarray]:
    """Sample id (manifest order) -> stored uint8 array, read with plain tarfile."""
    manifest = load_manifest(url)
    samples, first = {}, 0
    for shard in manifest.shards:
        with tarfile.open(shard.url) as tar:
            arrays = [
                np.load(io.BytesIO(tar.extractfile(m).read()))
                for m in tar
                if m.name.endswith(".npy")
            ]
        samples.update({first + i: a for i, a in enumerate(arrays)})
        first += shard.count
    return samples


def class_of(manifest):
    offsets = np.cumsum([s.count for s in manifest.shards])
    classes = np.array([s.class_id for s in manifest.shards])
    return lambda sample_id: int(classes[np.searchsorted(offsets, sample_id, side="right")])


def take(loader, count):
    """The first `count` batches; the workers are stopped at once (left to garbage collection,
    their shutdown lands in whatever test runs next and can cost it seconds)."""
    it = iter(loader)
    try:
        return [next(it) for _ in range(count)]
    finally:
        loader.close()


def test_sequences_are_distinct_images_of_one_class(digits_shards):
    loader = SequenceLoader(digits_shards, seq_len=5, batch_size=6, num_workers=2, return_meta=True)
    stored, label = stored_samples(digits_shards), class_of(loader.manifest)
    flips = Counter()
    for x, y, meta in take(loader, 15):
        assert x.shape == (6, 5, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        for row in range(6):
            ids = meta["sample_ids"][row].tolist()
            assert len(set(ids)) == 5
            assert {label(i) for i in ids} == {int(y[row])}
            for k, sample_id in enumerate(ids):
                image = torch.from_numpy(stored[sample_id].astype(np.float32) / 127.5 - 1)
                if torch.equal(image, image.flip(-1)):
                    continue  # symmetric: flip not observable
                if torch.equal(x[row, k], image):
                    flips["kept"] += 1
                else:
                    assert torch.equal(x[row, k], image.flip(-1))
                    flips["flipped"] += 1
    assert 0.35 < flips["flipped"] / sum(flips.values()) < 0.65


def epoch_sequences(loaders, epoch: int) -> list[tuple[int, ...]]:
    """Every sequence of ``epoch`` emitted by the given ranks' loaders (id tuples)."""
    sequences = []
    for loader in loaders:
        for _, _, meta in iter(loader):
            rows = meta["epoch"] == epoch
            sequences += [tuple(ids) for ids in meta["sample_ids"][rows].tolist()]
            if (meta["epoch"] > epoch).all():  # every stream of this rank is past the epoch
                break
    return sequences


def test_uniform_epoch_gives_every_class_the_same_number_of_sequences(digits_shards):
    ranks = [
        SequenceLoader(
            digits_shards,
            seq_len=5,
            batch_size=4,
            rank=r,
            world_size=2,
            num_workers=2,
            return_meta=True,
        )
        for r in range(2)
    ]
    label = class_of(ranks[0].manifest)
    sequences = epoch_sequences(ranks, 0)
    assert len(sequences) == ranks[0].sequences_per_epoch == 10 * (1797 // 50)
    assert set(Counter(label(s[0]) for s in sequences).values()) == {1797 // 50}
    assert ranks[0].epoch_length == 350 // 8


def test_proportional_epoch_uses_every_sample_at_most_once(digits_shards):
    loader = SequenceLoader(
        digits_shards,
        seq_len=5,
        batch_size=8,
        num_workers=2,
        class_sampling="proportional",
        return_meta=True,
    )
    manifest, label = loader.manifest, class_of(loader.manifest)
    first, second = epoch_sequences([loader], 0), None
    ids = [i for s in first for i in s]
    assert len(ids) == len(set(ids))
    per_class = Counter(label(s[0]) for s in first)
    for c in range(10):
        assert per_class[c] == sum(s.count // 5 for s in manifest.shards if s.class_id == c)
    fresh = SequenceLoader(
        digits_shards,
        seq_len=5,
        batch_size=8,
        num_workers=2,
        class_sampling="proportional",
        return_meta=True,
    )
    second = epoch_sequences([fresh], 1)
    assert len(second) == len(first) and set(second) != set(first)  # regrouped every epoch


def test_same_arguments_same_batches_other_seed_other_batches(digits_shards):
    def batches(seed):
        loader = SequenceLoader(digits_shards, seq_len=4, batch_size=5, num_workers=2, seed=seed)
        return take(loader, 4)

    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_no_workers_runs_in_process(digits_shards):
    x, y = take(
        SequenceLoader(digits_shards, seq_len=3, batch_size=2, num_workers=0, pin_memory=True), 1
    )[0]
    assert x.shape == (2, 3, 3, 8, 8) and y.shape == (2,)


@pytest.mark.parametrize("prefetch_factor", [1, 4])
def test_prefetch_depth_does_not_change_the_batches(digits_shards, prefetch_factor):
    # Workers write micro-batches into prefetch_factor + 1 reused slots: a slot rewritten before
    # the loader copied it out would show as a batch that differs from the default's.
    args = dict(seq_len=5, batch_size=6, num_workers=2, seed=1)
    reference = take(SequenceLoader(digits_shards, **args), 40)
    other = take(SequenceLoader(digits_shards, prefetch_factor=prefetch_factor, **args), 40)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference, other)
    )
    assert len({a[0].data_ptr() for a in other}) == 40  # every batch owns its memory


def test_tar_members_reads_what_tarfile_reads_and_refuses_a_bad_header(digits_shards, tmp_path):
    url = load_manifest(digits_shards).shards[3].url
    with tarfile.open(url) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar]
    with open(url, "rb") as f:
        members = [(name, bytes(data)) for name, data in tar_members(f)]
    assert members == expected
    broken = tmp_path / "broken.tar"
    raw = bytearray(Path(url).read_bytes())
    raw[2 * 512 + 5] ^= 1  # a name byte in the second member's header (after 512 + 512 bytes)
    broken.write_bytes(raw)
    with (
        open(broken, "rb") as f,
        pytest.raises(ValueError, match="tar header at byte 1024 has a bad checksum"),
    ):
        list(tar_members(f))


# -- damaged shards ---------------------------------------------------------------------------


@pytest.fixture
def damaged(digits_shards, tmp_path):
    """A copy of the shard set and a function (shard index, sample index) -> npy member's data offset."""
    root = tmp_path / "digits"
    shutil.copytree(digits_shards, root)
    manifest = load_manifest(str(root))

    def locate(shard: int, sample: int) -> tuple[str, str, int]:
        with tarfile.open(manifest.shards[shard].url) as tar:
            member = [m for m in tar if m.name.endswith(".npy")][sample]
        return manifest.shards[shard].url, member.name, member.offset_data

    return str(root), locate


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def full_epoch(root, **kwargs):
    loader = SequenceLoader(
        root,
        seq_len=5,
        batch_size=8,
        num_workers=0,
        class_sampling="proportional",
        return_meta=True,
        **kwargs,
    )
    return [
        ids
        for _, _, meta in take(loader, loader.epoch_length)
        for ids in meta["sample_ids"].tolist()
    ]


def test_corrupt_member_is_skipped_with_a_warning_naming_it(damaged):
    root, locate = damaged
    url, member, offset = locate(5, 3)
    patch(url, offset, b"garbage")  # breaks the .npy magic
    bad_id = sum(s.count for s in load_manifest(root).shards[:5]) + 3
    with pytest.warns(BadSampleWarning, match=f"shard {url}: member {member}") as record:
        sequences = full_epoch(root)
    assert len([w for w in record if issubclass(w.category, BadSampleWarning)]) == 1
    assert all(bad_id not in ids for ids in sequences)
    with pytest.raises(ShardError, match="exceed max_bad_samples=0"), warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        full_epoch(root, max_bad_samples=0)


def test_truncated_shard_counts_every_lost_sample_and_fails_past_the_budget(damaged):
    root, locate = damaged
    url, member, offset = locate(8, 10)
    count = load_manifest(root).shards[8].count
    with open(url, "r+b") as f:
        f.truncate(offset + 100)  # inside sample 10's array
    with pytest.warns(BadSampleWarning, match=f"shard {url}: samples #10..#{count - 1} missing"):
        full_epoch(root, max_bad_samples=count - 10)
    with (
        pytest.raises(
            ShardError, match=f"{count - 10} bad samples .* exceed max_bad_samples={count - 11}"
        ),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", BadSampleWarning)
        full_epoch(root, max_bad_samples=count - 11)


def test_checksum_mismatch_is_an_error_naming_the_shard(damaged):
    root, locate = damaged
    url, _, offset = locate(2, 0)
    patch(url, offset + 128 + 7, b"\x01")  # a pixel: still decodes, silently different
    with pytest.raises(ShardError, match=f"shard {url}: checksum mismatch"):
        full_epoch(root)
    assert (
        len(full_epoch(root, verify_checksums=False)) == 343 // 8 * 8
    )  # the check can be turned off


def test_missing_shards_are_named_before_training_and_when_deleted_later(damaged):
    root, _ = damaged
    shards = load_manifest(root).shards
    args = dict(seq_len=5, batch_size=8, num_workers=0)
    loader = SequenceLoader(root, **args)
    it = iter(loader)
    next(it)
    gone = [shards[4].url, shards[40].url]
    for url in gone:
        shutil.os.remove(url)
    # at start-up: every missing shard at once (one listing), before any batch
    with pytest.raises(
        ShardError, match=f"2 of the 65 shards .* do not exist: {gone[0]}, {gone[1]}"
    ):
        SequenceLoader(root, **args)
    # deleted while the run reads: named when a stream reaches it
    with pytest.raises(
        ShardError,
        match="shard .*/shards/c000\\d\\d_\\d{4}.tar listed in the manifest does not exist",
    ):
        for _ in range(loader.epoch_length):
            next(it)


def test_ranks_that_share_read_nothing_at_start_and_plan_what_an_unshared_rank_plans(
    digits_shards, tmp_path
):
    results = []

    def rank0_share(fn):  # rank 0 does the work; the others receive what it returned
        results.append(fn())
        return results[-1]

    args = dict(seq_len=5, batch_size=4, world_size=2, num_workers=2, seed=3)
    SequenceLoader(digits_shards, rank=0, share=rank0_share, **args)
    assert [type(r) for r in results] == [bytes, type(None)]  # the manifest, the shard check

    # Rank 1 given rank 0's results touches no storage while it starts: this URL does not exist.
    nowhere = str(tmp_path / "never-written")
    replay = iter(results)
    receiver = SequenceLoader(nowhere, rank=1, share=lambda fn: next(replay), **args)
    alone = SequenceLoader(digits_shards, rank=1, **args)
    assert receiver.manifest.fingerprint() == alone.manifest.fingerprint()
    assert receiver.manifest.shards[0].url.startswith(nowhere)
    assert receiver.epoch_length == alone.epoch_length
    for stream in (2, 3):  # rank 1's streams: the same rounds, built lazily per stream
        ours, theirs = receiver.plan.rounds(0, stream), alone.plan.rounds(0, stream)
        assert [r.slots for r in ours] == [r.slots for r in theirs]
        assert all(np.array_equal(a.order, b.order) for a, b in zip(ours, theirs))

    replay = iter(results)
    shared = SequenceLoader(digits_shards, rank=1, share=lambda fn: next(replay), **args)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(take(shared, 5), take(alone, 5))
    )
    assert set(shared.startup_s) == {"manifest", "plan", "shard_check"}


def test_a_failed_shard_check_on_rank_0_stops_the_ranks_it_shares_with(damaged):
    root, _ = damaged
    shutil.os.remove(load_manifest(root).shards[7].url)

    def from_rank0(fn):  # the trainer's share: rank 0's error raised on every rank
        try:
            return fn()
        except ShardError as err:
            raise ShardError(f"rank 0: {err}") from None

    with pytest.raises(ShardError, match="rank 0: 1 of the 65 shards .* do not exist"):
        SequenceLoader(root, seq_len=5, batch_size=4, num_workers=0, share=from_rank0)
