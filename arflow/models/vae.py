"""The one VAE of the project: diffusers' AutoencoderKL (the SD-VAE), loaded offline, encoding
images to latent moments for the data writer and decoding sampled latents for sample grids, FID
and launchers/sample.py.

The model works on scaled latents z = (mean + exp(logvar / 2) * eps) * scaling_factor (SD-VAE:
0.18215); decoding divides by the same factor. The factor is read, never typed in: from the VAE's
own config.json (`scaling_factor`, which make_shards records in the data manifest), or from the
manifest when the caller passes it; `load_vae` refuses the two when they disagree.
"""

from __future__ import annotations

from pathlib import Path

import torch


class VAE:
    """An AutoencoderKL in eval mode without gradients, with its latent scale.

    path: where it was loaded from (for messages); scaling_factor: latents are multiplied by it.
    """

    def __init__(self, autoencoder, scaling_factor: float, path: str):
        self.autoencoder, self.scaling_factor, self.path = autoencoder, float(scaling_factor), path
        config = autoencoder.config
        self.latent_channels = int(config.latent_channels)
        self.image_channels = int(config.out_channels)
        # Every encoder block but the last halves the resolution.
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.autoencoder.device

    def to(self, device: torch.device | str) -> VAE:
        """Move the weights (in place) and return self."""
        self.autoencoder.to(device)
        return self

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(c, h, w) of the latents of a square image of `image_size` pixels."""
        if image_size % self.downsampling:
            raise ValueError(
                f"image size {image_size} is not a multiple of the VAE's downsampling factor "
                f"{self.downsampling} ({self.path})"
            )
        side = image_size // self.downsampling
        return self.latent_channels, side, side

    def image_shape(self, latent_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the images decoded from square latents of `latent_size`."""
        side = latent_size * self.downsampling
        return self.image_channels, side, side

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: float (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, c, H/f, W/f) fp32,
        unscaled; logvar clamped to [-30, 20] as diffusers' posterior does."""
        x = images.to(self.device, self.autoencoder.dtype)
        posterior = self.autoencoder.encode(x).latent_dist
        return posterior.mean.float(), posterior.logvar.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: (B, c, h, w) scaled as the model sees them -> images (B, C, h*f, w*f) fp32,
        nominally in [-1, 1] (not clamped), on the VAE's device. Decoded in the VAE's own dtype
        (fp32 unless loaded otherwise) and outside any autocast: FID compares pixels."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"the VAE at {self.path} decodes (B, {self.latent_channels}, h, w) latents, got "
                f"{tuple(latents.shape)}"
            )
        z = latents.to(self.device, self.autoencoder.dtype) / self.scaling_factor
        with torch.autocast(self.device.type, enabled=False):
            return self.autoencoder.decode(z).sample.float()


def load_vae(
    path: str | Path, device: torch.device | str = "cpu", scaling_factor: float | None = None
) -> VAE:
    """A diffusers AutoencoderKL saved with `save_pretrained` (a local folder, or a hub id already
    in the local Hugging Face cache); nothing is ever downloaded.

    scaling_factor: the factor the data were scaled by (the manifest's `scaling_factor`); None
    takes the VAE's own. A value that differs from the VAE's config is refused: the latents
    would be decoded at the wrong scale.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError(
            f"the VAE {path} needs diffusers: install the `vae` extra (pip install 'arflow[vae]')"
        ) from err
    try:
        autoencoder = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load a diffusers AutoencoderKL from {path}: expected a folder written by "
            f"save_pretrained (config.json + weights), read offline ({err})"
        ) from err
    own = float(autoencoder.config.scaling_factor)
    if scaling_factor is not None and abs(float(scaling_factor) - own) > 1e-6 * own:
        raise ValueError(
            f"latent scale mismatch: the data were scaled by {scaling_factor} but the VAE at "
            f"{path} declares scaling_factor {own} in its config; use the VAE the data were "
            f"encoded with"
        )
    autoencoder = autoencoder.to(device).eval().requires_grad_(False)
    return VAE(autoencoder, own, str(path))
