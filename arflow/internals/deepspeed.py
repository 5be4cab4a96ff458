"""DeepSpeed internals ARFlow relies on; the module-level ones are checked when this module is
imported, the per-engine ones by `check_engine` when the backend is built.

- ZeRO-1/2 parameter fragments (`param._hp_mapping`: `get_hp_fragment()`,
  `lp_fragment_address`): this rank's fp32 master slice of a parameter without communication
  (the EMA follows it).
- ZeRO-3 partitions (`param.ds_tensor`, `ds_numel`, `ds_shape`).
- The ZeRO optimizer's `_global_grad_norm`: the step's norm while the step runs (the engine's
  public copy is refreshed only afterwards).
- `engine.checkpoint_engine`, through whose `save(state_dict, path)` every checkpoint file
  goes: swapped during a save, so that ARFlow stages and writes each file itself.
- The three plain classes DeepSpeed's checkpoint pickles hold (PICKLE_CLASSES).
- The universal-checkpoint converter (`ds_to_universal`, driven through its own argument
  parser), the `universal_checkpoint_info` it requires of a ZeRO-1/2 checkpoint, and the layout
  of the universal folder it writes (`match_universal_stage`).
- The bf16 config's `check_grad_overflow` switch.
- The name of the shared-memory buffer DeepSpeed's CPU all-reduce creates (set in its C++ op;
  tests/test_internals.py checks it against a real engine).

Imports DeepSpeed (seconds): only code that runs DeepSpeed imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from arflow.internals import Supported

SUPPORTED = Supported("deepspeed", "0.19.8", "0.19.8")


def _find(module: str, name: str, what: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise SUPPORTED.missing(deepspeed.__version__, f"{what} ({module}.{name})") from None


_CONSTANTS = "deepspeed.checkpoint.constants"
_CONVERTER = "deepspeed.checkpoint.ds_to_universal"


def check(installed: str = deepspeed.__version__) -> None:
    """`installed` in SUPPORTED, and the module-level internals above in place."""
    SUPPORTED.check(installed)
    fragment = _find("deepspeed.utils.tensor_fragment", "tensor_fragment", "ZeRO fragments")
    fields = {f.name for f in dataclasses.fields(fragment)}
    SUPPORTED.require(
        installed,
        {"hp_fragment", "lp_fragment_address"} <= fields,
        "tensor_fragment.hp_fragment and .lp_fragment_address",
    )
    SUPPORTED.require_parameters(
        installed,
        getattr(fragment, "get_hp_fragment", None),
        ["self", "optim_state_key"],
        "tensor_fragment.get_hp_fragment",
    )
    address = _find("deepspeed.utils.tensor_fragment", "fragment_address", "ZeRO fragments")
    SUPPORTED.require(
        installed,
        {"start", "numel"} <= {f.name for f in dataclasses.fields(address)},
        "fragment_address.start and .numel",
    )
    bf16 = _find("deepspeed.runtime.precision_config", "DeepSpeedBF16Config", "the bf16 config")
    SUPPORTED.require(
        installed,
        "check_grad_overflow" in getattr(bf16, "model_fields", {}),
        "the bf16 config key check_grad_overflow",
    )
    engine = _find(
        "deepspeed.runtime.checkpoint_engine.checkpoint_engine",
        "CheckpointEngine",
        "the checkpoint engine",
    )
    SUPPORTED.require_parameters(
        installed, engine.save, ["self", "state_dict", "path"], "CheckpointEngine.save"
    )
    SUPPORTED.require_parameters(
        installed,
        _find(_CONVERTER, "parse_arguments", "the universal converter"),
        [],
        "the universal converter's parse_arguments",
    )
    SUPPORTED.require_parameters(
        installed,
        _find(_CONVERTER, "main", "the universal converter"),
        ["args"],
        "the universal converter's main",
    )
    for name in (
        "DS_VERSION",
        "OPTIMIZER_STATE_DICT",
        "UNIVERSAL_CHECKPOINT_INFO",
        "UNIVERSAL_CHECKPOINT_VERSION_KEY",
        "UNIVERSAL_CHECKPOINT_VERSION_VALUE",
    ):
        _find(_CONSTANTS, name, "a checkpoint constant")


check()

_fragment_class = _find("deepspeed.utils.tensor_fragment", "tensor_fragment", "ZeRO fragments")
PICKLE_CLASSES = (
    _find("deepspeed.runtime.fp16.loss_scaler", "LossScaler", "a checkpoint class"),
    _find("deepspeed.runtime.zero.config", "ZeroStageEnum", "a checkpoint class"),
    _find("deepspeed.utils.tensor_fragment", "fragment_address", "a checkpoint class"),
)
_constants = importlib.import_module(_CONSTANTS)

# The bf16 section's switch for DeepSpeed's own non-finite gradient check (it reads two values
# on the host per step; the backend's step decision covers the gradient anyway).
BF16_NO_OVERFLOW_CHECK = {"check_grad_overflow": False}


# ----------------------------------------------------------------------------- start-up
def check_parameters(params: dict[str, nn.Parameter], stage: int) -> None:
    """Each parameter carries what ZeRO-`stage` puts on it and ARFlow reads."""
    installed = deepspeed.__version__
    names = ("ds_tensor", "ds_numel", "ds_shape") if stage == 3 else ("_hp_mapping",)
    for name, p in params.items():
        for attribute in names:
            SUPPORTED.require_attribute(
                installed, p, attribute, f"ZeRO-{stage}'s record on parameter {name}"
            )
        if stage != 3:
            mapping = p._hp_mapping
            SUPPORTED.require(
                installed,
                mapping is None or isinstance(mapping, _fragment_class),
                f"a tensor_fragment as parameter {name}'s _hp_mapping (got {type(mapping)})",
            )


def check_engine(engine, stage: int) -> None:
    """The internals of a built engine (`deepspeed.initialize`'s first result) in place."""
    installed = deepspeed.__version__
    SUPPORTED.require_attribute(
        installed, engine.optimizer, "_global_grad_norm", f"the ZeRO-{stage} optimizer's norm"
    )
    SUPPORTED.require_attribute(installed, engine, "checkpoint_engine", "the engine's")
    SUPPORTED.require_parameters(
        installed,
        getattr(engine.checkpoint_engine, "save", None),
        ["state_dict", "path"],
        "the engine's checkpoint_engine.save",
    )
    check_parameters({n: p for n, p in engine.module.named_parameters() if p.requires_grad}, stage)


# --------------------------------------------------------------------- ZeRO internals
class Fragment(NamedTuple):
    """This rank's slice of a parameter's fp32 master weights under ZeRO-1/2."""

    master: torch.Tensor  # (numel,) a view into the flat fp32 partition
    start: int  # where the slice starts in the flattened parameter
    numel: int


def fragment(p: nn.Parameter) -> Fragment | None:
    """The fp32 master slice of `p` this rank owns (ZeRO-1/2), None when it owns none."""
    mapping = p._hp_mapping
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    return Fragment(mapping.get_hp_fragment(), address.start, address.numel)


class Partition(NamedTuple):
    """A ZeRO-3 parameter's partitioning: each rank holds `local` elements of the flattened
    parameter padded to local * world_size; `numel` and `shape` are the full parameter's."""

    local: int
    numel: int
    shape: torch.Size


def partition(p: nn.Parameter) -> Partition:
    return Partition(p.ds_tensor.numel(), p.ds_numel, p.ds_shape)


def global_grad_norm(optimizer) -> torch.Tensor | float | None:
    """The ZeRO optimizer's global gradient norm of the step in progress (after the gradients
    are reduced, before the update): a tensor, or a float, inf when non-finite."""
    return optimizer._global_grad_norm


# ------------------------------------------------------------------------ checkpoints
@contextlib.contextmanager
def saves_intercepted(engine, save: Callable[[dict, str], None]) -> Iterator[None]:
    """Inside, every file the engine's `save_checkpoint` would write through its checkpoint
    engine goes to `save(state_dict, path)` instead (path as DeepSpeed names it); writing it,
    with `torch.save` in torch's zip format (DeepSpeed's default), is the caller's."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _Intercepting(inner, save)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


class _Intercepting:
    """A checkpoint engine whose `save` calls `save`; everything else is the wrapped engine's."""

    def __init__(self, inner, save):
        self._inner = inner
        self._save = save

    def save(self, state_dict, path: str) -> None:
        self._save(state_dict, path)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def record_universal_checkpoint_info(module: nn.Module) -> None:
    """Make every save of the engine wrapping `module` record what DeepSpeed's universal
    converter requires of a ZeRO-1/2 checkpoint (it refuses one without it)."""
    setattr(
        module,
        _constants.UNIVERSAL_CHECKPOINT_INFO,
        {
            _constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: _constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE
        },
    )


def convert_to_universal(src: str, dst: str) -> None:
    """DeepSpeed's universal checkpoint (one folder per parameter) of the ZeRO folder `src`,
    written to `dst`, in this process. The converter is a command-line tool: its own argument
    parser builds its arguments (so options it adds later get their defaults)."""
    from deepspeed.checkpoint import ds_to_universal

    argv = [
        "ds_to_universal",
        *("--input_folder", src, "--output_folder", dst),
        *("--num_extract_workers", "1", "--num_merge_workers", "1"),
    ]
    saved, sys.argv = sys.argv, argv
    try:
        args = ds_to_universal.parse_arguments()
    except SystemExit:
        raise SUPPORTED.missing(
            deepspeed.__version__, f"the universal converter's options {argv[1:]}"
        ) from None
    finally:
        sys.argv = saved
    ds_to_universal.main(args)


_STAGE12_STATES = "mp_rank_00_model_states.pt"
_STAGE3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def match_universal_stage(folder: str, stage: int) -> None:
    """Make a universal checkpoint converted from one ZeRO family (1/2 or 3) loadable by the
    other. DeepSpeed writes it in the source's layout and reads only the target's: the
    model-states file name, where the Adam step lives (a `step.pt` per parameter for ZeRO-1/2,
    the global optimizer state for ZeRO-3), the version tag ZeRO-1/2 requires and the wrapping
    of each tensor file differ. The tensors themselves (fp32, exp_avg, exp_avg_sq per
    parameter, full size) are the same. The files are the converter's output of a checkpoint
    already vetted; they are read weights-only all the same."""
    zero = os.path.join(folder, "zero")
    state_path = os.path.join(zero, "optimizer_state.pt")
    state = _load(state_path)
    from_stage3 = _constants.OPTIMIZER_STATE_DICT in state
    if (stage == 3) == from_stage3:
        return
    params = [d.path for d in os.scandir(zero) if os.path.isfile(os.path.join(d, "fp32.pt"))]
    if stage == 3:
        step = _load(os.path.join(params[0], "step.pt"))
        state[_constants.OPTIMIZER_STATE_DICT] = {
            "state": {0: {"step": step}},
            "param_groups": state["param_groups"],
        }
        shutil.copyfile(os.path.join(folder, _STAGE12_STATES), os.path.join(folder, _STAGE3_STATES))
    else:
        step = state[_constants.OPTIMIZER_STATE_DICT]["state"][0]["step"]
        for param in params:
            torch.save(step, os.path.join(param, "step.pt"))
            for key in ("fp32", "exp_avg", "exp_avg_sq"):  # ZeRO-3 stores bare tensors
                path = os.path.join(param, f"{key}.pt")
                tensor = _load(path)
                if torch.is_tensor(tensor):
                    torch.save({"param": tensor}, path)
        state.setdefault(_constants.DS_VERSION, deepspeed.__version__)
        shutil.copyfile(os.path.join(folder, _STAGE3_STATES), os.path.join(folder, _STAGE12_STATES))
    torch.save(state, state_path)


def _load(path: str):
    with torch.serialization.safe_globals(list(PICKLE_CLASSES)):
        return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- CPU all-reduce
def shared_memory_path(rank: int) -> str:
    """The shared-memory file DeepSpeed's CPU communication backend creates for `rank` when
    every rank runs on one machine (LOCAL_SIZE == world size), named after the user and the
    rendezvous address and port."""
    name = "_".join(
        (
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(rank),
        )
    )
    return os.path.join("/dev/shm", name)


def release_shared_memory_name(rank: int) -> None:
    """DeepSpeed maps one ~70 MB shared-memory buffer per rank (for an all-reduce the trainer
    never calls) and never unlinks its name: every run would leave world_size buffers in
    /dev/shm until the machine's memory runs out. Each rank has mapped every peer's buffer by
    the time `deepspeed.initialize` returns, so after a barrier each rank drops the name of its
    own (the mappings stay valid)."""
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shared_memory_path(rank))
