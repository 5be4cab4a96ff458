"""`arflow make-shards` (tools/make_shards.py) and arflow.data.writing.build: layout, content, idempotence, VAE, S3, torchrun."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arflow.cli import command_parser
from arflow.cli import main as arflow
from arflow.cli.make_shards import parse_size
from arflow.data.manifest import load_manifest
from arflow.data.writing.build import build_shards
from arflow.data.writing.encoders import PixelEncoder, VaeEncoder
from arflow.data.writing.images import read_image
from arflow.data.writing.sources import DigitsSource, ImageFolderSource

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_shards.py"


def read_tar(path) -> list[tuple[str, int, np.ndarray]]:
    """(key, class, array) of every sample, read with plain tarfile (independent of arflow's reader)."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [(k, int(v["cls"]), np.load(io.BytesIO(v["npy"]))) for k, v in samples.items()]


def test_help_explains_every_flag():
    parser = command_parser("make-shards")
    text = parser.format_help()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:  # --local_rank: the deepspeed launcher's, not ours
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        for option in action.option_strings:
            assert option in text
    result = subprocess.run(
        [sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60
    )
    assert (
        result.returncode == 0
        and "--shard-size" in result.stdout
        and "--endpoint-url" in result.stdout
    )


def test_vae_encoding_needs_a_vae_path(capsys):
    with pytest.raises(SystemExit):
        arflow(["make-shards", "digits", "--out", "somewhere", "--encode", "vae"])
    assert "--encode vae needs --vae PATH" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("256MB") == 256_000_000 and parse_size("64KiB") == 65536
    assert parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_digits_cli_writes_one_class_per_shard_with_checksums(tmp_path):
    out = tmp_path / "digits"
    result = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "digits",
            "--out",
            str(out),
            "--image-size",
            "8",
            "--shard-size",
            "64KB",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1797/1797" in result.stderr  # the progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["encoding"] == "pixels"
    assert manifest["sample_shape"] == [3, 8, 8] and manifest["stored"] == {
        "dtype": "uint8",
        "shape": [3, 8, 8],
    }
    source = DigitsSource(8)
    expected_counts = [len(items) for _, items in source.classes]
    assert [c["count"] for c in manifest["classes"]] == expected_counts
    assert [c["name"] for c in manifest["classes"]] == [str(d) for d in range(10)]
    for entry in manifest["classes"]:
        assert len(entry["shards"]) >= 5  # a class spans several shards
    counts = {}
    for shard in manifest["shards"]:
        path = out / shard["path"]
        data = path.read_bytes()
        assert len(data) == shard["bytes"] <= 64_000 + 10240  # cap plus the tar's record padding
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        samples = read_tar(path)
        assert len(samples) == shard["count"]
        assert {cls for _, cls, _ in samples} == {shard["class_id"]}
        counts.setdefault(shard["class_id"], []).append(shard["count"])
    for sizes in counts.values():
        assert max(sizes) - min(sizes) <= 1  # near-equal shards


def test_digits_content_matches_source(digits_shards):
    manifest = load_manifest(digits_shards)
    source = DigitsSource(8)
    for class_id, (_, items) in enumerate(source.classes):
        expected = sorted(source.load(i).tobytes() for i in items)
        stored = sorted(
            a.tobytes()
            for s in manifest.shards
            if s.class_id == class_id
            for _, _, a in read_tar(s.url)
        )
        assert stored == expected
        assert all(
            a.dtype == np.uint8 and a.shape == (3, 8, 8)
            for s in manifest.shards[:1]
            for _, _, a in read_tar(s.url)
        )


def test_rerun_skips_complete_shards_and_rewrites_damaged_ones(tmp_path):
    out = str(tmp_path)
    first = build_shards(DigitsSource(8), PixelEncoder(8), out, shard_size=64_000, progress=False)
    shard_paths = [Path(s.url) for s in first.shards]
    mtimes = {p: p.stat().st_mtime_ns for p in shard_paths}
    damaged, unfinished = shard_paths[3], shard_paths[7]
    damaged.write_bytes(damaged.read_bytes()[:-2000] + b"\0" * 2000)  # same size, other content
    Path(str(unfinished) + ".json").unlink()  # as if killed between rename and sidecar
    Path(str(shard_paths[9]) + ".partial").write_bytes(b"left over by a killed run")
    second = build_shards(DigitsSource(8), PixelEncoder(8), out, shard_size=64_000, progress=False)
    rewritten = {p for p in shard_paths if p.stat().st_mtime_ns != mtimes[p]}
    assert rewritten == {damaged, unfinished}
    assert second.to_dict() == first.to_dict()  # deterministic bytes, identical checksums


def make_image_folder(root: Path, sizes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(
                0, 256, (6 + i % 3, 12, 3), dtype=np.uint8
            )  # wide, varying heights
            Image.fromarray(pixels).save(root / name / f"img{i}.png")


def test_image_folder_centre_crop_and_min_per_class(tmp_path, caplog):
    make_image_folder(tmp_path / "src", {"b_cat": 6, "a_dog": 5, "c_rare": 2})
    with caplog.at_level(logging.WARNING, logger="arflow.data"):
        manifest = build_shards(
            ImageFolderSource(str(tmp_path / "src"), 4),
            PixelEncoder(4),
            str(tmp_path / "out"),
            min_per_class=3,
            progress=False,
        )
    assert "c_rare (2)" in caplog.text
    assert manifest.class_names == ["a_dog", "b_cat"] and manifest.counts == [5, 6]
    assert load_manifest(str(tmp_path / "out")).dropped_classes == [{"name": "c_rare", "count": 2}]
    # the reader's ADM centre crop (tested on its own in test_data_images.py)
    expected = read_image(str(tmp_path / "src" / "a_dog" / "img1.png"), 4)
    stored = [a for s in manifest.shards if s.class_id == 0 for _, _, a in read_tar(s.url)]
    assert any(np.array_equal(a, expected) for a in stored)


def test_image_folder_errors_name_the_class_and_the_file(tmp_path):
    make_image_folder(tmp_path / "src", {"a_full": 3})
    (tmp_path / "src" / "b_empty").mkdir()
    with pytest.raises(ValueError, match="class 'b_empty'.*no images"):
        build_shards(
            ImageFolderSource(str(tmp_path / "src"), 4),
            PixelEncoder(4),
            str(tmp_path / "o"),
            progress=False,
        )
    (tmp_path / "src" / "b_empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        build_shards(
            ImageFolderSource(str(tmp_path / "src"), 4),
            PixelEncoder(4),
            str(tmp_path / "o"),
            progress=False,
        )
    # the class written before the failure is kept, and skipped by the next run
    assert (tmp_path / "o" / "shards" / "c00000_0000.tar.json").exists()


@pytest.fixture(scope="module")
def vae_shards(tmp_path_factory, tiny_vae):
    root = tmp_path_factory.mktemp("vae_shards")
    make_image_folder(root / "src", {"a": 8, "b": 7})
    out = str(root / "out")
    build_shards(
        ImageFolderSource(str(root / "src"), 16),
        VaeEncoder(tiny_vae, 16, device="cpu", batch_size=4),
        out,
        shard_size=40_000,
        progress=False,
    )
    return str(root / "src"), out


def test_vae_moments_of_image_and_flip(vae_shards, tiny_vae):
    from diffusers import AutoencoderKL

    src, out = vae_shards
    manifest = load_manifest(out)
    assert manifest.encoding == "vae" and manifest.sample_shape == (4, 8, 8)
    assert manifest.stored_shape == (2, 8, 8, 8) and manifest.scaling_factor == pytest.approx(
        0.18215
    )
    assert len(manifest.shards) == 4  # 8 + 7 samples of 8 KB in shards of at most 40 KB
    source = ImageFolderSource(src, 16)
    images = (
        torch.from_numpy(np.stack([source.load(p) for p in source.classes[0][1]])).float() / 127.5
        - 1
    )
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():
        posterior, flipped = vae.encode(images).latent_dist, vae.encode(images.flip(-1)).latent_dist
    for _, _, moments in read_tar(manifest.shards[0].url):
        # samples are stored in a seeded shuffled order: find the image by its mean
        distance = (posterior.mean - torch.from_numpy(moments[0, :4])).abs().flatten(1).amax(1)
        i = int(distance.argmin())
        assert distance[i] < 1e-4
        np.testing.assert_allclose(moments[0, 4:], posterior.logvar[i].numpy(), atol=1e-4)
        np.testing.assert_allclose(moments[1, :4], flipped.mean[i].numpy(), atol=1e-4)
        np.testing.assert_allclose(moments[1, 4:], flipped.logvar[i].numpy(), atol=1e-4)


def test_loader_draws_latents_from_the_stored_moments(vae_shards):
    from arflow.data import SequenceLoader
    from arflow.data.plan import PlanConfig, Planner
    from arflow.data.sequences import noise_seed

    _, out = vae_shards
    loader = SequenceLoader(
        out,
        seq_len=3,
        batch_size=4,
        num_workers=0,
        seed=7,
        return_meta=True,
        window=4,
        expect_shape=(4, 8, 8),
        expect_encoding="vae",
    )
    manifest = loader.manifest
    planner = Planner(
        [s.count for s in manifest.shards],
        [s.class_id for s in manifest.shards],
        [True] * len(manifest.shards),
        PlanConfig(3, "uniform", 7, 4),
    )
    stored = {}
    offsets = np.cumsum([0] + [s.count for s in manifest.shards])
    for shard, info in enumerate(manifest.shards):
        for position, (_, _, moments) in enumerate(read_tar(info.url)):
            stored[offsets[shard] + position] = (shard, position, moments)
    flips_seen = set()
    x, y, meta = next(iter(loader))
    for row in range(4):
        ids, epoch = meta["sample_ids"][row].tolist(), int(meta["epoch"][row])
        shard = stored[ids[0]][0]
        groups = planner.groups(shard, epoch)
        members = [stored[i][1] for i in ids]
        group = next(g for g in range(len(groups.members)) if groups.members[g].tolist() == members)
        # the sequence's own generator, keyed by (seed, epoch, shard, group)
        generator = torch.Generator().manual_seed(noise_seed(7, epoch, shard, group))
        eps = torch.randn((3, 4, 8, 8), generator=generator).numpy()
        for k, sample_id in enumerate(ids):
            flip = int(groups.flips[group][k])
            flips_seen.add(flip)
            mean, logvar = np.split(stored[sample_id][2][flip], 2)
            expected = (mean + np.exp(logvar / 2) * eps[k]) * 0.18215
            np.testing.assert_allclose(x[row, k].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert int(y[row]) == manifest.shards[shard].class_id
    assert flips_seen == {0, 1}


def test_vae_without_diffusers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match="`vae` extra"):
        VaeEncoder(str(tmp_path), 16)


def test_cli_writes_to_s3_and_the_loader_streams_it(moto_s3):
    from arflow.data import SequenceLoader

    url = f"s3://{moto_s3.bucket()}/digits"
    result = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "digits",
            "--out",
            url,
            "--image-size",
            "8",
            "--shard-size",
            "200KB",
            "--endpoint-url",
            moto_s3.url,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    loader = SequenceLoader(
        url,
        seq_len=5,
        batch_size=8,
        num_workers=0,
        storage_options=moto_s3.storage_options,
        return_meta=True,
    )
    x, y, meta = next(iter(loader))
    assert x.shape == (8, 5, 3, 8, 8)
    ids = meta["sample_ids"]
    assert all(len(set(row.tolist())) == 5 for row in ids)


@pytest.mark.slow
def test_torchrun_ranks_split_classes_and_rank0_writes_the_manifest(tmp_path):
    single = build_shards(
        DigitsSource(8),
        PixelEncoder(8),
        str(tmp_path / "single"),
        shard_size=64_000,
        progress=False,
    )
    out = tmp_path / "distributed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(TOOL),
            "digits",
            "--out",
            str(out),
            "--image-size",
            "8",
            "--shard-size",
            "64KB",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2" in result.stderr and "rank 1/2" in result.stderr
    written = load_manifest(str(out))
    assert [(s.path, s.sha256) for s in written.shards] == [
        (s.path, s.sha256) for s in single.shards
    ]
    assert written.counts == single.counts
