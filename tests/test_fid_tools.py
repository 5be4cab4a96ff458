"""`arflow fid` (and tools/fid.py) on a few images: a folder, its pixel shards and an
ADM `.npz` of the same images give the same statistics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from random_inception import write_random_weights

from arflow.cli import main as arflow
from arflow.data.writing.build import build_shards
from arflow.data.writing.encoders import PixelEncoder
from arflow.data.writing.sources import ImageFolderSource
from arflow.eval import frechet_distance, load_reference
from arflow.eval.image_sets import image_batches

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """4 random 8x8 images as a class folder, as pixel shards and as an ADM sample .npz."""
    tmp = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        (tmp / "folder" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp / "folder" / f"class{i % 2}" / f"{i}.png")
    build_shards(
        ImageFolderSource(str(tmp / "folder"), 8),
        PixelEncoder(8),
        str(tmp / "shards"),
        progress=False,
    )
    np.savez(tmp / "samples.npz", arr_0=images)
    weights = write_random_weights(tmp / "random_inception.pth")
    return tmp, str(weights)


def run_cli(argv, capsys) -> dict:
    assert arflow(["fid", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_reference_from_shards_folder_and_npz_agree(image_sets, single_process_env, capsys):
    tmp, weights = image_sets
    common = [
        "--inception-weights",
        weights,
        "--device",
        "cpu",
        "--no-progress",
        "--batch-size",
        "3",
    ]
    out = run_cli(
        ["reference", str(tmp / "shards"), "--out", str(tmp / "ref_shards.npz"), *common],
        capsys,
    )
    assert out["num_samples"] == 4
    run_cli(
        [
            "reference",
            str(tmp / "folder"),
            "--resolution",
            "8",
            "--out",
            str(tmp / "ref_folder.npz"),
            *common,
        ],
        capsys,
    )
    run_cli(
        ["stats", str(tmp / "samples.npz"), "--out", str(tmp / "ref_npz.npz"), *common],
        capsys,
    )
    mu, sigma = load_reference(tmp / "ref_shards.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    for other in ("ref_folder.npz", "ref_npz.npz"):  # same pixels, any source, any order
        mu2, sigma2 = load_reference(tmp / other)
        np.testing.assert_allclose(mu2, mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(sigma2, sigma, rtol=1e-5, atol=1e-9)
    # distance: a statistics file against an image set computed on the fly
    result = run_cli(
        ["distance", str(tmp / "ref_shards.npz"), str(tmp / "samples.npz"), *common],
        capsys,
    )
    assert abs(result["fid"]) < 1e-6


def fid_distance(a: Path, b: Path, **env: str) -> subprocess.CompletedProcess:
    """`tools/fid.py distance a b` on the CPU, in a subprocess (extra environment in env)."""
    return subprocess.run(
        [sys.executable, str(REPO / "tools/fid.py"), "distance", str(a), str(b), "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=120,
    )


def test_distance_script_prints_json(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 50, 16))
    stats = []
    for name, x in (("a.npz", a), ("b.npz", b + 1)):
        np.savez(tmp_path / name, mu=x.mean(0), sigma=np.cov(x, rowvar=False))
        stats.append((x.mean(0), np.cov(x, rowvar=False)))
    proc = fid_distance(tmp_path / "a.npz", tmp_path / "b.npz")
    assert proc.returncode == 0, proc.stderr
    fid = json.loads(proc.stdout)["fid"]
    assert fid == pytest.approx(frechet_distance(*stats[0], *stats[1]), rel=1e-9)


def test_clear_errors_for_wrong_inputs(tmp_path, image_sets):
    tmp, _ = image_sets
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="lacks the key"):
        load_reference(tmp_path / "bad.npz")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (9, 8)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="different sizes"):
        list(image_batches(mixed, batch_size=2))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .png"):
        list(image_batches(empty, batch_size=2))
    manifest = json.loads((tmp / "shards" / "manifest.json").read_text())
    manifest.update(encoding="vae", scaling_factor=0.18215)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="reference statistics need images"):
        list(image_batches(tmp_path / "vae", batch_size=2))


def test_distance_names_a_missing_file_before_any_download(tmp_path):
    """A mistyped .npz is named at once: no Inception weights download is attempted (TORCH_HOME
    is an empty folder here) and no shard manifest is blamed."""
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "b.npz", mu=rng.standard_normal(4), sigma=np.eye(4))
    home = tmp_path / "torch_home"
    home.mkdir()
    proc = fid_distance(tmp_path / "typo.npz", tmp_path / "b.npz", TORCH_HOME=str(home))
    assert proc.returncode == 2, proc.stderr  # an argument error
    assert f"{tmp_path / 'typo.npz'} does not exist" in proc.stderr
    assert "manifest" not in proc.stderr and "download" not in proc.stderr.lower()
    assert not any(home.iterdir())  # nothing fetched into torch-fidelity's cache
