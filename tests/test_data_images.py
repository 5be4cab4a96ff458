"""The one image reader (arflow.data.writing.images): ADM's centre crop against hand-computed
cases, and the same images for training shards and FID reference statistics."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from arflow.data.writing.images import list_images, read_image
from arflow.data.writing.sources import ImageFolderSource


def blocks_with_zero_mean_detail(coarse: np.ndarray, amplitude: int) -> np.ndarray:
    """(h, w, 3) -> (2h, 2w, 3): each pixel becomes a 2x2 block [[+a, -a], [-a, +a]] around it, so
    that every horizontal pair and every 2x2 block averages exactly to the coarse pixel."""
    fine = np.kron(coarse, np.ones((2, 2, 1))).astype(np.int64)
    sign = np.kron(np.ones(coarse.shape[:2]), [[1, -1], [-1, 1]])[..., None]
    return fine + amplitude * sign.astype(np.int64)


def test_adm_crop_halves_with_a_box_filter_then_crops_the_centre(tmp_path):
    # 12 x 8 (W x H) to S = 2: the short side 8 >= 4 -> 6 x 4; 4 >= 4 -> 3 x 2; 2 < 4 stops. The
    # bicubic step then scales by 2 / 2 = 1 (no change), and the centre crop starts at column
    # (3 - 2) // 2 = 0, row 0. By construction the two halvings give exactly `coarse`.
    coarse = np.array([[20, 60, 100], [140, 180, 220]])[..., None] + np.array([0, 3, 6])
    image = blocks_with_zero_mean_detail(blocks_with_zero_mean_detail(coarse, 8), 4)
    assert image.shape == (8, 12, 3) and image.min() >= 0 and image.max() <= 255
    Image.fromarray(image.astype(np.uint8)).save(tmp_path / "wide.png")

    out = read_image(str(tmp_path / "wide.png"), 2)

    expected = np.array([[20, 60], [140, 180]])[None] + np.array([0, 3, 6])[:, None, None]
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8 and out.shape == (3, 2, 2)


def keys_bicubic_upscale(row: np.ndarray, size: int) -> np.ndarray:
    """1-D bicubic resampling (Keys' kernel, a = -0.5) of ``row`` (n, ...) to ``size`` samples for
    size >= n: output sample i sits at source coordinate (i + 0.5) n / size, source pixel j at
    j + 0.5; taps beyond the border are dropped and the remaining weights renormalised."""

    def kernel(x):
        x = abs(x)
        if x < 1:
            return 1.5 * x**3 - 2.5 * x**2 + 1
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2 if x < 2 else 0.0

    n = len(row)
    out = []
    for i in range(size):
        centre = (i + 0.5) * n / size
        taps = [j for j in range(n) if abs(j + 0.5 - centre) < 2]
        weights = np.array([kernel(j + 0.5 - centre) for j in taps])
        out.append(np.tensordot(weights / weights.sum(), row[taps], axes=1))
    return np.stack(out)


def test_adm_crop_resizes_the_short_side_bicubically_then_crops_the_centre(tmp_path):
    # 5 x 2 (W x H) to S = 4: no halving (2 < 8); scale 4 / 2 = 2 -> 10 x 4 bicubic; the crop
    # keeps columns (10 - 4) // 2 = 3 .. 6.
    rng = np.random.default_rng(0)
    image = rng.integers(40, 216, (2, 5, 3))
    Image.fromarray(image.astype(np.uint8)).save(tmp_path / "small.png")

    out = read_image(str(tmp_path / "small.png"), 4)

    wide = keys_bicubic_upscale(image.transpose(1, 0, 2), 10)  # columns first, as PIL does
    wide = np.clip(np.round(wide), 0, 255)  # PIL keeps uint8 between the two passes
    full = keys_bicubic_upscale(wide.transpose(1, 0, 2), 4)  # (4 rows, 10 cols, 3)
    expected = np.clip(np.round(full), 0, 255)[:, 3:7].transpose(2, 0, 1)
    assert out.shape == (3, 4, 4)
    # PIL computes in fixed point: at most one grey level from the float computation
    assert np.abs(out.astype(int) - expected).max() <= 1
    # and the crop offset is the one stated: any other window of the 10 x 4 image differs more
    others = [
        np.abs(
            out.astype(int) - np.clip(np.round(full), 0, 255)[:, c : c + 4].transpose(2, 0, 1)
        ).max()
        for c in range(7)
        if c != 3
    ]
    assert min(others) > 1


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        read_image(str(tmp_path / "broken.jpg"), 4)


def test_image_folder_source_lists_every_image_type_recursively(tmp_path):
    rng = np.random.default_rng(1)
    names = ["a.png", "b.JPG", "c.bmp", "d.webp", "nested/e.tiff", "notes.txt"]
    for name in names:
        path = tmp_path / "cls" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(path)
    assert list_images(str(tmp_path / "cls")) == names[:5]
    ((name, items),) = ImageFolderSource(str(tmp_path), 4).classes
    assert name == "cls" and items == [f"cls/{n}" for n in names[:5]]


def test_fid_reference_reads_the_same_images_as_the_shards_hold(tmp_path):
    from arflow.data import load_manifest
    from arflow.data.shards import iter_shard
    from arflow.data.writing.build import build_shards
    from arflow.data.writing.encoders import PixelEncoder
    from arflow.eval.image_sets import ImageFolder

    rng = np.random.default_rng(2)
    sizes = {"a/x.png": (9, 14), "a/y.bmp": (20, 11), "b/z.webp": (16, 16), "b/deep/w.JPG": (7, 5)}
    for name, (h, w) in sizes.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
    manifest = build_shards(
        ImageFolderSource(str(tmp_path / "src"), 4),
        PixelEncoder(4),
        str(tmp_path / "out"),
        progress=False,
    )
    stored = [
        array.tobytes()
        for shard in load_manifest(manifest.url).shards
        for _, array in iter_shard(shard, dtype="uint8", shape=(3, 4, 4), on_bad=None)
    ]
    reference = [ImageFolder(tmp_path / "src", 4)[i][0].numpy().tobytes() for i in range(4)]
    assert len(stored) == 4 and sorted(stored) == sorted(reference)
