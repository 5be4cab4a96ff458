"""Write a class-bucketed WebDataset shard set (one class per shard) and its manifest.json.

Reads:  SOURCE: 'digits' (scikit-learn's bundled 8x8 digits, 10 classes, 1,797 images) or an
        ImageFolder tree (one sub-folder of images per class); with --encode vae, the SD-VAE
        folder (--vae).
Writes: --out (a local directory or an fsspec URL such as s3://bucket/prefix): shards/*.tar and
        manifest.json. Re-running skips every complete shard whose checksum still matches, so
        an interrupted run resumes by running it again. One run writes to an --out at a time:
        a second one is refused, naming the run that holds it (host, pid, start time).

  arflow make-shards digits --out data/digits --image-size 8
  arflow make-shards IMAGENET/train --out s3://bucket/in256 --image-size 256 \\
      --encode vae --vae SD_VAE_DIR --workers 16 [--endpoint-url https://minio.example:9000]
  torchrun --nproc_per_node 8 -m arflow make-shards IMAGENET/train --out s3://... \\
      --encode vae --vae SD_VAE_DIR     # each rank writes the classes c % WORLD_SIZE == RANK

SD_VAE_DIR: a folder saved with diffusers' AutoencoderKL.save_pretrained (e.g. sd-vae-ft-ema).
S3 credentials come from the standard AWS environment variables, config files or roles.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from .common import UsageError

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


class DefaultsHelpFormatter(
    argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
):
    """The description as written, every option's default after its help."""


def parse_size(text: str) -> int:
    """'256MB', '64KiB', '1000' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 256MB, 64KiB, 1000000)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument(
        "source",
        help="'digits' (scikit-learn's bundled 8x8 digits, 10 classes, 1,797 images) "
        "or the path of an ImageFolder tree: one sub-folder of images per class",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output root: a local directory or a URL such as "
        "s3://bucket/prefix; manifest.json and shards/ go there",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="side S of the stored square images: "
        "digits are resized to SxS; folder images get ADM's centre crop (box-filter halving while "
        "the short side is >= 2S, bicubic to short side S, centre SxS)",
    )
    parser.add_argument(
        "--encode",
        choices=["pixels", "vae"],
        default="pixels",
        help="'pixels' stores uint8 images; 'vae' stores SD-VAE latent moments (mean, logvar) "
        "of each image and of its horizontal flip (needs --vae and the `vae` extra)",
    )
    parser.add_argument(
        "--vae",
        metavar="PATH",
        help="directory loadable by diffusers' "
        "AutoencoderKL.from_pretrained (required with --encode vae)",
    )
    parser.add_argument(
        "--vae-batch-size", type=int, default=32, help="images per VAE forward pass"
    )
    parser.add_argument(
        "--latent-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="dtype of the stored latent moments (--encode vae)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="device for the VAE: auto (CUDA when present), cpu, cuda:0, ...",
    )
    parser.add_argument(
        "--shard-size",
        type=parse_size,
        default="256MB",
        help="upper bound on a shard's size (units B, KB, MB, GB, KiB, MiB, GiB); a class "
        "larger than this spans several near-equal shards",
    )
    parser.add_argument(
        "--min-per-class",
        type=int,
        metavar="N",
        help="drop (and report) classes with fewer "
        "than N images instead of writing them; by default every class is kept",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="parallel processes: whole shards with "
        "--encode pixels, image decoding with --encode vae",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the per-class shuffle before sharding"
    )
    parser.add_argument(
        "--endpoint-url",
        help="endpoint of an S3-compatible store (MinIO, Ceph, a local "
        "moto_server, ...) for s3:// outputs; credentials come from the AWS environment",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_arguments(args: argparse.Namespace) -> None:
    if args.encode == "vae" and not args.vae:
        raise UsageError("--encode vae needs --vae PATH")
    if args.image_size <= 0 or args.workers <= 0 or args.vae_batch_size <= 0:
        raise UsageError("--image-size, --workers and --vae-batch-size must be positive")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import torch.distributed as dist

    from arflow.data.writing.build import OutputInUseError, build_shards
    from arflow.data.writing.encoders import PixelEncoder, VaeEncoder
    from arflow.data.writing.sources import make_source

    storage_options = (
        {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    )
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:  # torchrun: gloo is enough to exchange shard records
        dist.init_process_group("gloo")

    def gather(records):
        everything = [None] * world_size
        dist.all_gather_object(everything, records)
        return everything

    try:
        source = make_source(args.source, args.image_size)
        encoder = (
            VaeEncoder(
                args.vae,
                args.image_size,
                device=args.device,
                batch_size=args.vae_batch_size,
                dtype=args.latent_dtype,
            )
            if args.encode == "vae"
            else PixelEncoder(args.image_size)
        )
        manifest = build_shards(
            source,
            encoder,
            args.out,
            shard_size=args.shard_size,
            min_per_class=args.min_per_class,
            workers=args.workers,
            seed=args.seed,
            storage_options=storage_options,
            rank=rank,
            world_size=world_size,
            progress=not args.no_progress,
            **({"gather": gather} if world_size > 1 else {}),
        )
        if manifest is not None:
            print(
                f"wrote {manifest.url}: {manifest.num_classes} classes, {sum(manifest.counts)} samples, "
                f"{len(manifest.shards)} shards, sample shape {list(manifest.sample_shape)} ({manifest.encoding})"
            )
        if world_size > 1:
            dist.barrier()  # gloo: destroying right after a collective can abort a peer still inside it
    except OutputInUseError as err:  # every rank alike: nothing was written
        print(f"arflow make-shards: {err}", file=sys.stderr)
        if world_size > 1:
            dist.barrier()
        return 1
    finally:
        # On failure no barrier: this rank exits with an error and torchrun stops the others.
        if world_size > 1:
            dist.destroy_process_group()
    return 0
