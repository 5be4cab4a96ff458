"""InceptionV3 features through torch-fidelity's TensorFlow-compatible port.

The FID/IS convention is the 2015 TensorFlow Inception graph: its 2048-d pool features for FID
and its 1008-way logits without bias ("logits_unbiased", as the original IS code reads them).
torch-fidelity reproduces that graph, including its bilinear resize to 299 x 299, so numbers
are comparable with pytorch-fid, torch-fidelity and the ADM evaluation suite.

Weights are resolved explicitly, never swapped for others: a given path must exist; otherwise
torch-fidelity's own cache file is used, downloaded there only if the machine is online.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

POOL_DIM = 2048
NUM_LOGITS = 1008
_FEATURES = ["2048", "logits_unbiased"]


def cached_weights_path() -> Path:
    """Where torch-fidelity keeps its weights: <torch hub dir>/checkpoints/<file of the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


def resolve_weights(path: str | None) -> Path:
    """The weights file to load: `path` when given (it must exist), else the cache file.

    Raises FileNotFoundError naming the expected file and how to provide it.
    """
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise FileNotFoundError(
                f"Inception weights file {given} does not exist (set by --inception-weights or "
                f"eval.inception_weights); it must be torch-fidelity's InceptionV3 weights "
                f"({URL_INCEPTION_V3})"
            )
        return given
    cached = cached_weights_path()
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
    except OSError as err:  # URLError, DNS and socket failures are all OSErrors
        raise FileNotFoundError(
            f"InceptionV3 weights not found: expected {cached} (torch-fidelity's cache, under "
            f"TORCH_HOME) and downloading {URL_INCEPTION_V3} failed ({err}). On a machine "
            f"without internet, fetch that file elsewhere and copy it to {cached}, or pass its "
            f"path with --inception-weights / eval.inception_weights."
        ) from err
    return cached


class InceptionFeatures:
    """Callable: uint8 images (B, C, H, W), C in {1, 3}, any H, W -> (pool (B, 2048) float64,
    logits (B, 1008) float64). Grayscale images are repeated to RGB."""

    def __init__(self, weights: str | None, device: torch.device | str):
        path = resolve_weights(weights)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", _FEATURES, feature_extractor_weights_path=str(path)
            )
        except Exception as err:  # unpickling and load_state_dict failures alike: name the file
            raise ValueError(
                f"{path} does not hold torch-fidelity InceptionV3 weights: {err}"
            ) from err
        self.device = torch.device(device)
        self.net.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception features need uint8 images (B, 1 or 3, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        images = images.to(self.device).expand(-1, 3, -1, -1)
        with _strict_fp32(self.device):
            pool, logits = self.net(images)
        return pool.double(), logits.double()


@contextlib.contextmanager
def _strict_fp32(device: torch.device):
    """Turn TF32 off on CUDA while extracting features: a trainer may enable it globally, and
    TF32 convolutions shift the features enough to move FID against references made in fp32."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
