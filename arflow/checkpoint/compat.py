"""Whether a checkpoint can continue under this run's config, decided before anything is loaded:
a change the checkpoint cannot follow is refused naming the config key and both values; a
change of layout (world size, ZeRO stage, DeepSpeed's precision: meta.json records the precision
a run resolved) is loaded by resharding."""

from __future__ import annotations

from arflow.checkpoint.layout import Found
from arflow.config import Config, ConfigError, ModelConfig
from arflow.distributed.backend import resolve_precision
from arflow.distributed.env import DistInfo


def check_compatible(found: Found, cfg: Config, info: DistInfo) -> bool:
    """Fail clearly if the checkpoint cannot be resumed with `cfg`. Returns whether its layout
    differs from this run's, so that loading must reshard."""
    saved = found.meta["config"]
    try:
        saved_arch = ModelConfig(**saved["model"]).architecture()
        saved_parallel = saved["parallel"]
        backend, stage = saved_parallel["backend"], saved_parallel["zero_stage"]
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"checkpoint {found.url}: its recorded config is unreadable ({err}); resume it with "
            f"the arflow version that wrote it"
        ) from None
    arch = cfg.model.architecture()
    # Only whether label dropout is on changes a shape (the null-class row), not its rate.
    for a in (saved_arch, arch):
        a["class_dropout_prob"] = a["class_dropout_prob"] > 0
    diff = [
        f"model.{k}: checkpoint {saved_arch[k]!r}, config {arch[k]!r}"
        for k in arch
        if saved_arch[k] != arch[k]
    ]
    if diff:
        raise ConfigError(
            f"checkpoint {found.url} does not fit this config; parameter shapes would change "
            f"({'; '.join(diff)}). Start a new run (another checkpoint.dir) to train a new shape."
        )
    if backend != cfg.parallel.backend:
        raise ConfigError(
            f"parallel.backend: checkpoint {found.url} was written by {backend!r}, the config "
            f"uses {cfg.parallel.backend!r}; optimizer-state layouts differ between backends"
        )
    layout_changed = found.meta["world_size"] != info.world_size
    if backend == "deepspeed":
        # DeepSpeed names and lays out its optimizer files by ZeRO stage and by precision (bf16
        # or not): its universal checkpoint converts between them.
        layout_changed |= stage != cfg.parallel.zero_stage
        here = resolve_precision(cfg, info.device)
        saved_precision = saved_parallel.get("precision", "auto")
        there = found.meta.get("precision") or (
            here if saved_precision == "auto" else saved_precision
        )
        layout_changed |= (here == "bf16") != (there == "bf16")
    return layout_changed
