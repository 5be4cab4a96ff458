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
    """Stores the SD-VAE's posterior moments of the image and of its horizontal flip
    (the project's one VAE module, arflow.models.vae, loaded offline).

    Stored array per image: (2, 2c, h, w) float; index 0 the image, 1 its flip; channels
    [mean; logvar] (logvar clamped as diffusers does). The loader draws
    x = (mean + exp(logvar / 2) * eps) * scaling_factor, the factor from the VAE's config.
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
        from arflow.models.vae import load_vae

        self.path = path
        self.device = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else "cpu"
            if device == "auto"
            else device
        )
        self.vae = load_vae(path, self.device)
        self.batch_size = batch_size
        self.dtype = dtype
        channels, side, _ = self.vae.latent_shape(image_size)
        self.sample_shape = (channels, side, side)
        self.stored_shape = (2, 2 * channels, side, side)
        self.scaling_factor = self.vae.scaling_factor

    def describe(self) -> dict:
        return {"encoding": self.encoding, "vae": self.path, "dtype": self.dtype}

    def encode(self, images: np.ndarray) -> np.ndarray:
        """images: (N, 3, S, S) uint8 -> (N, 2, 2c, h, w) moments of [image, flipped image]."""
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[start : start + self.batch_size]).float() / 127.5 - 1
            mean, logvar = self.vae.encode_moments(torch.cat([x, x.flip(-1)]))
            moments = torch.cat([mean, logvar], dim=1)  # (2n, 2c, h, w)
            both = torch.stack(moments.chunk(2), dim=1)  # (n, 2, 2c, h, w)
            out.append(both.to("cpu", getattr(torch, self.dtype)).numpy())
        return np.concatenate(out)
