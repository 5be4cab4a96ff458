"""evaluate(): FID and Inception Score of a model, split over all ranks."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..models.vae import VAE, load_vae
from .inception import InceptionFeatures, resolve_weights
from .sample_set import ImageGenerator, SampleNpzWriter, rank_range
from .statistics import FeatureStats, fid_against, load_reference


def check_eval_files(cfg: EvalConfig) -> None:
    """Fail now, naming the file, if a file the evaluation reads is missing or unreadable: the
    Inception weights (resolved as InceptionFeatures does) and the reference statistics. The VAE
    is checked by loading it (arflow.models.vae.load_vae), which its users do up front."""
    resolve_weights(cfg.inception_weights)
    if cfg.reference:
        load_reference(cfg.reference)


def evaluate(
    model: torch.nn.Module,
    cfg: EvalConfig,
    *,
    device: torch.device | str,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    save_npz: str | Path | None = None,
    vae: VAE | None = None,
) -> dict:
    """Generate cfg.num_samples images over all ranks and score them. Every rank calls it.

    model: the weights to sample with (pass the EMA module), already on its sampling device.
    device: where the Inception network, the VAE and the statistics live.
    rank, world_size: default to torch.distributed's when it is initialised, else 0 and 1.
    save_npz: also write the set as an ADM `.npz` (arr_0 uint8 NHWC, arr_1 labels) there.
    vae: decodes a latent model's samples; None loads cfg.vae (if set) onto `device`.

    Returns, identical on all ranks: fid (None without cfg.reference), inception_score and
    inception_score_std (over cfg.is_splits splits), num_samples, seconds (slowest rank, up to
    the statistics reduction) and feature_seconds (its Inception share, slowest rank).
    """
    started = time.perf_counter()
    rank, world_size = _rank_and_world(rank, world_size)
    device = torch.device(device)
    # Everything that can fail on a path or a file does so before hours of sampling.
    reference = load_reference(cfg.reference) if cfg.reference else None
    inception = InceptionFeatures(cfg.inception_weights, device)
    if vae is None and cfg.vae:
        vae = load_vae(cfg.vae, device)
    generator = ImageGenerator(model, cfg.sampler, cfg.seed, cfg.labels, vae)
    stats = FeatureStats(cfg.num_samples, cfg.is_splits, device)
    share = rank_range(cfg.num_samples, rank, world_size)
    writer = None
    if save_npz is not None:
        labels = generator.labels_of(range(cfg.num_samples))
        writer = SampleNpzWriter(save_npz, labels, generator.image_shape, rank, world_size)

    # Rank 0 draws the bar for all ranks without extra collectives: ranks advance in lockstep,
    # so after k batches rank r has done about min(k * batch, size of its share).
    shares = [len(rank_range(cfg.num_samples, r, world_size)) for r in range(world_size)]
    bar = tqdm(
        total=cfg.num_samples, disable=not (progress and rank == 0), unit="img", desc="eval samples"
    )
    feature_seconds = 0.0
    for k, first in enumerate(range(share.start, share.stop, cfg.batch_size), start=1):
        indices = range(first, min(first + cfg.batch_size, share.stop))
        _, images = generator(indices)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so that sampling time is not billed to features
        tick = time.perf_counter()
        pool, logits = inception(images)
        stats.update(pool, logits, torch.as_tensor(indices))  # syncs: the timing is honest
        feature_seconds += time.perf_counter() - tick
        if writer is not None:
            writer.write(indices, images)
        bar.update(sum(min(k * cfg.batch_size, n) for n in shares) - bar.n)
    if writer is not None:
        writer.close()

    # Per-rank timings ride along in the one reduction, so every rank reports the same numbers.
    timings = torch.zeros(2 * world_size, dtype=torch.float64)
    timings[rank], timings[world_size + rank] = time.perf_counter() - started, feature_seconds
    timings = stats.all_reduce(extra=timings)
    bar.update(cfg.num_samples - bar.n)
    bar.close()

    is_mean, is_std = stats.inception_score()
    return {
        "fid": None if reference is None else fid_against(stats, reference),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "num_samples": int(stats.count.item()),
        "seconds": float(timings[:world_size].max()),
        "feature_seconds": float(timings[world_size:].max()),
    }


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if initialised:
        actual = dist.get_rank(), dist.get_world_size()
        if rank not in (None, actual[0]) or world_size not in (None, actual[1]):
            raise ValueError(
                f"rank={rank}, world_size={world_size} disagree with torch.distributed's "
                f"rank {actual[0]} of {actual[1]}"
            )
        return actual
    rank, world_size = rank or 0, world_size or 1
    if world_size > 1:
        raise ValueError(
            f"world_size={world_size} but torch.distributed is not initialised: the ranks' "
            f"statistics could not be combined"
        )
    return rank, world_size
