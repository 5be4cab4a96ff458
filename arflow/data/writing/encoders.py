"""What make_shards stores per image: the pixels, or SD-VAE latent moments of the image and its flip."""

from __future__ import annotations

import numpy as np
import torch


class PixelEncoder:
    """Stores the uint8 image as is: (3, S, S)."""

    encoding = "pixels"
    dtype = "uint8"
    scaling_factor = None

    def __init__(self, image_size: int):
        self.sample_shape = (3, image_size, image_size)
        self.stored_shape = self.sample_shape

    def describe(self) -> dict:
        return {"encoding": self.encoding}

    def encode(self, images: np.ndarray) -> np.ndarray:
        """images: (N, 3, S, S) uint8 -> (N, 3, S, S) uint8."""
        return images


class VaeEncoder:
    """Stores diffusers ``AutoencoderKL`` posterior moments of the image and of its horizontal flip.

    Stored array per image: (2, 2c, h, w) float; index 0 the image, 1 its flip; channels [mean; logvar]
    (logvar as clamped by diffusers). The loader draws x = (mean + exp(logvar / 2) * eps) * scaling_factor.
    """

    encoding = "vae"

    def __init__(
        self,
        path: str,
        image_size: int,
        *,
        device: str = "auto",
        batch_size: int = 32,
        dtype: str = "float32",
    ):
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:
            raise ImportError(
                "--encode vae needs diffusers: install the `vae` extra (pip install 'arflow[vae]')"
            ) from exc
        self.path = path
        self.device = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else "cpu"
            if device == "auto"
            else device
        )
        self.vae = AutoencoderKL.from_pretrained(path).to(self.device).eval()
        self.batch_size = batch_size
        self.dtype = dtype
        config = self.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        if image_size % factor:
            raise ValueError(
                f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}"
            )
        channels, side = config.latent_channels, image_size // factor
        self.sample_shape = (channels, side, side)
        self.stored_shape = (2, 2 * channels, side, side)
        self.scaling_factor = float(config.scaling_factor)

    def describe(self) -> dict:
        return {"encoding": self.encoding, "vae": self.path, "dtype": self.dtype}

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """images: (N, 3, S, S) uint8 -> (N, 2, 2c, h, w) moments of [image, flipped image]."""
        out = []
        for start in range(0, len(images), self.batch_size):
            x = (
                torch.from_numpy(images[start : start + self.batch_size]).to(self.device).float()
                / 127.5
                - 1
            )
            both = torch.cat([x, x.flip(-1)])
            posterior = self.vae.encode(both).latent_dist
            moments = torch.cat([posterior.mean, posterior.logvar], dim=1)  # (2n, 2c, h, w)
            out.append(
                torch.stack(moments.chunk(2), dim=1).to("cpu", getattr(torch, self.dtype)).numpy()
            )
        return np.concatenate(out)
