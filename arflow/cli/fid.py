"""FID between image sets, and the reference statistics of a dataset (InceptionV3, 2048-d).

  arflow fid reference SRC --out ref.npz [--resolution 256]  statistics of a training set
  arflow fid stats SRC --out stats.npz                        statistics of any image set
  arflow fid distance A B                                     prints {"fid": ...}

Reads:  SRC, A, B: a folder of PNG/JPEG images, an ADM sample .npz (arr_0 uint8 NHWC, as
        `arflow evaluate --save-npz` writes) or a pixel shard set (local or s3://); A and B may
        also be statistics files (keys mu, sigma: ours or ADM reference batches); the
        torch-fidelity InceptionV3 weights (--inception-weights, default its cache).
Writes: --out, statistics .npz (mu, sigma; set it as eval.reference in a run config); one JSON
        line on stdout. Runs under torchrun too, the images split over the ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import json

from .common import UsageError, local_rank_argument


def inception_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command that runs InceptionV3 shares."""
    parser.add_argument(
        "--inception-weights",
        help="torch-fidelity InceptionV3 weights file "
        "(default: torch-fidelity's cache, downloaded there when online)",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fid_command", required=True, metavar="WHAT")
    reference = sub.add_parser(
        "reference", help="reference statistics of a dataset at the model's resolution"
    )
    reference.add_argument(
        "src", help="shard set (directory with manifest.json or URL) or image folder"
    )
    reference.add_argument(
        "--resolution",
        type=int,
        help="resize + centre-crop every image to this size first, as ADM's "
        "reference batches do (needed for folders of mixed sizes)",
    )
    stats = sub.add_parser("stats", help="Inception statistics (mu, sigma) of an image set")
    stats.add_argument("src", help="folder of PNG/JPEG, ADM sample .npz (arr_0), or shard set")
    for p in (reference, stats):
        p.add_argument("--out", required=True, help="statistics .npz (keys mu, sigma)")
    distance = sub.add_parser("distance", help="FID between two statistics files or image sets")
    distance.add_argument("a", help="statistics .npz (mu, sigma) or an image set as for stats")
    distance.add_argument("b", help="the same kinds as a")
    for p in (reference, stats, distance):
        p.add_argument("--batch-size", type=int, default=50, help="images per Inception pass")
        p.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
        inception_arguments(p)
        local_rank_argument(p)


@contextlib.contextmanager
def process_group(device: str, timeout_s: float | None = None):
    """Join the job's process group for one command and leave it; with several ranks, a rank
    that fails stops the others within seconds instead of leaving them in a collective."""
    import torch.distributed as dist

    from arflow.config import ParallelConfig
    from arflow.distributed.env import init_distributed, shutdown
    from arflow.distributed.failure import FailureWatch

    info = init_distributed(device, timeout_s or ParallelConfig.collective_timeout_s)
    failure = FailureWatch(info).start() if info.world_size > 1 else None
    try:
        yield info
    except BaseException as error:
        if failure is not None:
            failure.report(error)
        dist.destroy_process_group()  # no barrier: the other ranks are stopping or gone
        raise
    if failure is not None:
        failure.stop()
    shutdown()


def run(args: argparse.Namespace) -> int:
    from arflow.eval.image_sets import source_kind

    sources = [args.a, args.b] if args.fid_command == "distance" else [args.src]
    # A missing or unusable input is an argument error, before any process group, download
    # or Inception work.
    for src in sources:
        try:
            source_kind(src)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from None
    if args.fid_command == "distance":
        return _distance(args)
    from arflow.eval.image_sets import image_set_stats
    from arflow.eval.inception import InceptionFeatures

    with process_group(args.device) as info:
        inception = InceptionFeatures(args.inception_weights, info.device)
        stats = image_set_stats(
            args.src,
            inception,
            batch_size=args.batch_size,
            resolution=getattr(args, "resolution", None),
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
        if info.is_main:
            stats.save(args.out)
            print(json.dumps({"out": args.out, "num_samples": int(stats.count.item())}))
    return 0


def _distance(args: argparse.Namespace) -> int:
    from arflow.eval.image_sets import stats_of
    from arflow.eval.statistics import frechet_distance

    with process_group(args.device) as info:
        a, b = stats_of(
            [args.a, args.b],
            args.inception_weights,
            info.device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
        if info.is_main:
            print(json.dumps({"fid": frechet_distance(*a, *b)}))
    return 0
