"""Command lines of the evaluation: launchers/evaluate.py, tools/fid.py, tools/fid_reference.py.

All run as `python`, under `torchrun` or under `deepspeed`: the launchers export RANK /
WORLD_SIZE / LOCAL_RANK, and the work is split over the ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json

import torch.distributed as dist

from ..config import ParallelConfig, apply_overrides, config_from_dict, load_config
from ..distributed.env import DistInfo, init_distributed, shutdown
from ..distributed.failure import FailureWatch
from ..models import load_pretrained
from .evaluate import evaluate
from .image_sets import image_set_stats, source_kind, stats_of
from .inception import InceptionFeatures
from .statistics import frechet_distance

# The public release's evaluation (its sample_ddp.py + the ADM suite): 50,000 samples with
# uniformly random labels, SiT's SDE with 250 steps and a final mean step of 0.04, guidance on
# the first 3 latent channels, fp32 with TF32 matmuls, latents decoded by the VAE (eval.vae, its
# own scale), images written as an ADM .npz. "paper-cfg" is the guided figure (CFG 1.5).
PROTOCOLS = {
    "paper": [
        "eval.num_samples=50000",
        "eval.labels=random",
        "eval.sampler.method=sde",
        "eval.sampler.steps=250",
        "eval.sampler.last_step_size=0.04",
        "eval.sampler.cfg_scale=1.0",
        "eval.sampler.cfg_channels=3",
        "eval.sampler.precision=tf32",
    ],
}
PROTOCOLS["paper-cfg"] = [*PROTOCOLS["paper"], "eval.sampler.cfg_scale=1.5"]


@contextlib.contextmanager
def _process_group(device: str, timeout_s: float = ParallelConfig.collective_timeout_s):
    """Join the job's process group for one command and leave it; with several ranks, a rank
    that fails stops the others within seconds instead of leaving them in a collective."""
    info: DistInfo = init_distributed(device, timeout_s)
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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inception-weights",
        help="torch-fidelity InceptionV3 weights file "
        "(default: torch-fidelity's cache, downloaded there when online)",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--no-progress", action="store_true")
    # deepspeed's launcher appends --local_rank; the rank comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def evaluate_main(argv: list[str] | None = None) -> dict:
    """launchers/evaluate.py: FID / IS of a checkpoint; rank 0 prints the result as JSON."""
    parser = argparse.ArgumentParser(description=evaluate_main.__doc__)
    parser.add_argument(
        "--ckpt",
        required=True,
        help="weights (arflow.models.load_pretrained): a .safetensors written by the trainer or "
        "tools/convert_ckpt.py, a run or checkpoint step directory, or a checkpoint root",
    )
    parser.add_argument("--config", help="run config JSON (its eval section)")
    parser.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        help="preset eval settings: 'paper' reproduces the release's FID-50K protocol, "
        "'paper-cfg' its guided figure (CFG 1.5); needs --save-npz; --set still overrides",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. eval.num_samples=10000 (repeatable)",
    )
    parser.add_argument("--save-npz", help="also write the samples as an ADM .npz (arr_0 NHWC)")
    parser.add_argument("--out", help="also write the result JSON to this file (rank 0)")
    _common(parser)
    args = parser.parse_args(argv)
    if args.protocol and not args.save_npz:
        parser.error(f"--protocol {args.protocol} writes the ADM .npz: pass --save-npz PATH")
    overrides = [*PROTOCOLS.get(args.protocol, []), *args.set]
    if args.config:
        cfg = load_config(args.config, overrides)
    else:
        cfg = config_from_dict(apply_overrides({}, overrides))
    eval_cfg = cfg.eval
    if args.inception_weights:
        eval_cfg = dataclasses.replace(eval_cfg, inception_weights=args.inception_weights)
    device = args.device if args.device != "auto" else cfg.parallel.device
    with _process_group(device, cfg.parallel.collective_timeout_s) as info:
        model = load_pretrained(args.ckpt, info.device).requires_grad_(False)
        result = evaluate(
            model,
            eval_cfg,
            device=info.device,
            progress=not args.no_progress,
            save_npz=args.save_npz,
        )
        if info.is_main:
            text = json.dumps(result)
            print(text)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
    return result


def fid_main(argv: list[str] | None = None) -> None:
    """tools/fid.py: `stats SRC --out stats.npz` and `distance A B` (prints {"fid": ...})."""
    parser = argparse.ArgumentParser(description="FID between image sets (InceptionV3, 2048-d).")
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="Inception statistics (mu, sigma) of an image set")
    stats.add_argument("src", help="folder of PNG/JPEG, ADM sample .npz (arr_0), or shard set")
    stats.add_argument("--out", required=True, help="statistics .npz (keys mu, sigma)")
    distance = sub.add_parser("distance", help="FID between two statistics files or image sets")
    distance.add_argument("a", help="statistics .npz (mu, sigma) or an image set as for stats")
    distance.add_argument("b")
    for p in (stats, distance):
        p.add_argument("--batch-size", type=int, default=50)
        p.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
        _common(p)
    args = parser.parse_args(argv)
    _check_sources(parser, [args.src] if args.command == "stats" else [args.a, args.b])
    if args.command == "stats":
        _stats_command(args, resolution=None)
        return
    with _process_group(args.device) as info:
        kwargs = dict(
            batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.no_progress
        )
        a, b = stats_of([args.a, args.b], args.inception_weights, info.device, **kwargs)
        if info.is_main:
            print(json.dumps({"fid": frechet_distance(*a, *b)}))


def fid_reference_main(argv: list[str] | None = None) -> None:
    """tools/fid_reference.py: reference statistics of a dataset at the model's resolution."""
    parser = argparse.ArgumentParser(description=fid_reference_main.__doc__)
    parser.add_argument(
        "src", help="shard set (directory with manifest.json or URL) or image folder"
    )
    parser.add_argument("--out", required=True, help="statistics .npz (keys mu, sigma)")
    parser.add_argument(
        "--resolution",
        type=int,
        help="resize + centre-crop every image to this size first, as ADM's "
        "reference batches do (needed for folders of mixed sizes)",
    )
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    _common(parser)
    args = parser.parse_args(argv)
    _check_sources(parser, [args.src])
    _stats_command(args, resolution=args.resolution)


def _check_sources(parser: argparse.ArgumentParser, sources: list[str]) -> None:
    """A missing or unusable input is an argument error, before any process group, download or
    Inception work."""
    for src in sources:
        try:
            source_kind(src)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))


def _stats_command(args: argparse.Namespace, resolution: int | None) -> None:
    with _process_group(args.device) as info:
        inception = InceptionFeatures(args.inception_weights, info.device)
        stats = image_set_stats(
            args.src,
            inception,
            batch_size=args.batch_size,
            resolution=resolution,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
        if info.is_main:
            stats.save(args.out)
            print(json.dumps({"out": args.out, "num_samples": int(stats.count.item())}))
