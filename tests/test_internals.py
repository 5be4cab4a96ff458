"""The adapters over torch's and DeepSpeed's internals (arflow.internals).

Each internal ARFlow uses is exercised against the installed library (DeepSpeed engines in one
gloo process on the CPU); each adapter's version check refuses versions outside its range with
an error naming the library, the version and the range, and a missing internal by name; the
bounds in pyproject.toml are the adapters' ranges; and no module outside arflow/internals
reaches into those internals.
"""

from __future__ import annotations

import argparse
import ast
import io
import pickle
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_MODEL_CONFIG
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from arflow.internals import UnsupportedLibraryError, release
from arflow.internals import dcp as dcp_internals
from arflow.internals import torch as torch_internals
from arflow.utils.safe_load import CorruptFileError, UnsafeCheckpointError, load_torch_file

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- versions and bounds
def adapters():
    from arflow.internals import deepspeed as ds_internals

    return [torch_internals, dcp_internals, ds_internals]


def test_release_numbers():
    assert release("2.14.0+cu130") == (2, 14, 0)
    assert release("2.6") == (2, 6, 0)
    assert release("0.19.8") == (0, 19, 8)
    with pytest.raises(ValueError, match="not a version"):
        release("latest")


@pytest.mark.parametrize("adapter", range(3), ids=["torch", "dcp", "deepspeed"])
def test_versions_outside_the_range_are_refused_by_name(adapter):
    module = adapters()[adapter]
    supported = module.SUPPORTED
    module.check()  # the installed version passes (it did at import, too)
    major, minor, patch = release(supported.minimum)
    older = f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.9"
    newer = f"{major}.{release(supported.maximum)[1] + 1}.0"
    for fake in (older, newer):
        with pytest.raises(UnsupportedLibraryError) as err:
            module.check(fake)
        message = str(err.value)
        assert f"{supported.library} {fake} is installed" in message
        assert f"{supported.minimum} to {supported.maximum}" in message
        assert supported.requirement in message


def test_a_missing_internal_is_named():
    from torch import nn

    from arflow.internals import deepspeed as ds_internals

    plain = {"blocks.0.w": nn.Parameter(torch.zeros(3))}  # never seen by DeepSpeed
    with pytest.raises(UnsupportedLibraryError) as err:
        ds_internals.check_parameters(plain, stage=2)
    message = str(err.value)
    assert "deepspeed 0.19.8 lacks ZeRO-2's record on parameter blocks.0.w (`_hp_mapping`)" in (
        message
    )
    assert "supported: deepspeed 0.19.8 to 0.19.8" in message
    with pytest.raises(UnsupportedLibraryError, match="`ds_tensor`"):
        ds_internals.check_parameters(plain, stage=3)
    # A signature other than the expected one is named with what was found.
    with pytest.raises(
        UnsupportedLibraryError, match=r"taking \(grad, x\); found \(input, inplace\)"
    ):
        torch_internals.SUPPORTED.require_parameters(
            torch.__version__, torch.nn.functional.silu, ["grad", "x"], "silu"
        )


def test_pyproject_bounds_are_the_adapters_ranges():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    found: dict[str, set] = {}
    for line in lines:
        requirement = Requirement(line)
        found.setdefault(requirement.name, set()).add(requirement.specifier)
    from arflow.internals import deepspeed as ds_internals

    for supported in (torch_internals.SUPPORTED, ds_internals.SUPPORTED):
        assert found[supported.library] == {Requirement(supported.requirement).specifier}


# ------------------------------------------------------- nobody else touches the internals
SCANNED = ("arflow", "benchmarks", "tools", "launchers")
LIBRARIES = ("torch", "deepspeed")
# Internals the adapters own: attributes, functions, classes, constants, keyword arguments.
PRIVATE_NAMES = {
    # DeepSpeed
    "_hp_mapping", "get_hp_fragment", "hp_fragment", "lp_fragment_address", "tensor_fragment",
    "fragment_address", "ds_tensor", "ds_numel", "ds_shape", "_global_grad_norm",
    "checkpoint_engine", "ds_to_universal", "parse_arguments", "UNIVERSAL_CHECKPOINT_INFO",
    "UNIVERSAL_CHECKPOINT_VERSION_KEY", "UNIVERSAL_CHECKPOINT_VERSION_VALUE",
    "OPTIMIZER_STATE_DICT", "DS_VERSION", "LossScaler", "ZeroStageEnum",
    "DeepSpeedBF16Config", "check_grad_overflow", "cdb",
    # torch
    "set_element", "_get_metadata_path", "load_id", "mappings", "original_state_dict",
    "flatten_state_dict", "_get_layout", "_MEM_FORMAT_ENCODING", "_StorageInfo",
    "_metadata_fn", "silu_backward", "_shutdown_workers", "_MultiProcessingDataLoaderIter",
    "_use_new_zipfile_serialization", "_record_memory_history", "_dump_snapshot",
}  # fmt: skip
# Strings that spell a library's internal names, file layout or wording.
PRIVATE_STRINGS = (
    "deepspeed_allreduce_buffer", "check_grad_overflow", "universal_checkpoint_info",
    "optimizer_state.pt", "_model_states.pt", "GLOBAL ", "Trying to call reduce",
    "Can only build", "Can only create new object", "Unsupported operand",
)  # fmt: skip


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every use of a library internal in `source` (docstrings aside)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
            chain = [node.attr]
            inner = node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in LIBRARIES:
                private = [a for a in chain if a.startswith("_") and not a.startswith("__")]
                if private or "ops" in chain:
                    found.append((node.lineno, f"{inner.id}.{'.'.join(reversed(chain))}"))
        elif isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.keyword) and node.arg:
            names.append(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None) or ""
            targets = [module] if module else []
            for alias in node.names:
                names.append(alias.name.rpartition(".")[2])
                targets.append(f"{module}.{alias.name}" if module else alias.name)
            for target in targets:
                parts = target.split(".")
                if parts[0] in LIBRARIES and any(
                    p.startswith("_") and not p.startswith("__") for p in parts
                ):
                    found.append((node.lineno, target))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            found += [(node.lineno, repr(s)) for s in PRIVATE_STRINGS if s in node.value]
            if node.value in PRIVATE_NAMES:  # an allowlist entry, a getattr
                found.append((node.lineno, repr(node.value)))
        found += [(node.lineno, name) for name in names if name in PRIVATE_NAMES]
    return sorted(set(found))


def test_no_module_outside_the_adapters_touches_library_internals():
    uses = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative.parts[:2] == ("arflow", "internals"):
                continue
            uses += [f"{relative}:{line}: {what}" for line, what in private_uses(path.read_text())]
    assert uses == [], "use arflow.internals instead:\n" + "\n".join(uses)


def test_the_guard_sees_private_uses():
    sample = (
        "from torch.distributed.checkpoint._traverse import set_element\n"  # 1
        "norm = engine.optimizer._global_grad_norm\n"  # 2
        "torch.ops.aten.silu_backward.grad_input(g, x, grad_input=g)\n"  # 3
        "compiled = torch._dynamo.config\n"  # 4
        "name = 'deepspeed_allreduce_buffer_0'\n"  # 5
        "torch.save(x, f, _use_new_zipfile_serialization=False)\n"  # 6
        "allowed = {('torch.serialization', '_get_layout')}\n"  # 7
        "def f():\n"
        "    '''Reads `_hp_mapping` (a docstring may name it).'''\n"
        "    return torch.nn.functional.silu(x), self._own_attribute\n"
    )
    assert sorted({line for line, _ in private_uses(sample)}) == [1, 2, 3, 4, 5, 6, 7]


# ------------------------------------------------------------------------------ torch
def raw_pickle(*ops: bytes) -> bytes:
    """A protocol-2 pickle made of `ops`: a hand-made attack, as no pickler writes these."""
    return pickle.PROTO + b"\x02" + b"".join(ops) + pickle.STOP


ATTACKS = {
    # A function outside the allowlist (never resolved: the unpickler refuses first).
    "GLOBAL ": raw_pickle(pickle.GLOBAL, b"posix\nsystem\n"),
    # Calling an object built from allowed parts: torch.Size()() would run Size's __call__.
    "Trying to call reduce": raw_pickle(
        pickle.GLOBAL, b"torch\nSize\n", pickle.EMPTY_TUPLE, pickle.REDUCE,
        pickle.EMPTY_TUPLE, pickle.REDUCE,
    ),
    "Can only create new object": raw_pickle(
        pickle.GLOBAL, b"torch\nSize\n", pickle.EMPTY_TUPLE, pickle.REDUCE,
        pickle.EMPTY_TUPLE, pickle.NEWOBJ,
    ),
    "Can only build": raw_pickle(pickle.GLOBAL, b"torch\nSize\n", pickle.EMPTY_DICT, pickle.BUILD),
}  # fmt: skip


@pytest.mark.parametrize("words", list(ATTACKS))
def test_weights_only_refusals_are_told_from_damage(tmp_path, words):
    path = tmp_path / "attack.pt"
    path.write_bytes(ATTACKS[words])
    with pytest.raises(UnsafeCheckpointError) as err:
        load_torch_file(str(path))
    assert words in str(err.value) and "never executed" in str(err.value)
    assert "Please use" not in str(err.value)  # torch's advice to load it anyway is cut


def test_damaged_pickles_are_not_refusals(tmp_path):
    path = tmp_path / "damaged.pt"
    path.write_bytes(raw_pickle(b"\xfe"))  # no such opcode
    with pytest.raises(CorruptFileError, match="Unsupported operand 254"):
        load_torch_file(str(path))
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    path.write_bytes(buf.getvalue()[:-40])  # a truncated torch file
    with pytest.raises(CorruptFileError, match="corrupt"):
        load_torch_file(str(path))
    try:
        torch.load(io.BytesIO(raw_pickle(b"\xfe")), weights_only=True)
    except pickle.UnpicklingError as err:
        assert torch_internals.weights_only_refusal(err) is None


def test_dataloader_workers_are_shut_down():
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children()}
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1)
    iterator = iter(loader)
    next(iterator)
    workers = [p for p in me.children() if p.pid not in before]
    assert workers, "the DataLoader started no worker process"
    torch_internals.shutdown_workers(iterator)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == []
    # A single-process iterator has no workers: nothing to do.
    torch_internals.shutdown_workers(iter(torch.utils.data.DataLoader([1, 2])))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_history_is_recorded_and_dumped(tmp_path):
    torch_internals.start_memory_history(1000)
    kept = torch.empty(1 << 20, device="cuda")
    torch_internals.dump_memory_history(tmp_path / "history.pickle")
    snapshot = pickle.loads((tmp_path / "history.pickle").read_bytes())
    assert snapshot["segments"] and any(snapshot["device_traces"]), snapshot.keys()
    del kept


# -------------------------------------------------------------------------------- DCP
class ListingFileSystem(FileSystem):
    """DCP's local file system, noting every file it opens for writing."""

    def __init__(self):
        self.written: list[str] = []

    def create_stream(self, path, mode):
        if "w" in mode:
            self.written.append(str(path))
        return super().create_stream(path, mode)


def dcp_state() -> dict:
    return {
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}]},
    }


def test_dcp_writes_and_reads_through_the_replaced_file_system(tmp_path, process_group):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    writer = FileSystemWriter(str(tmp_path))
    listing = ListingFileSystem()
    dcp_internals.replace_filesystem(writer, listing)
    dcp.save(dcp_state(), storage_writer=writer)
    on_disk = sorted(str(p) for p in tmp_path.iterdir())
    # Every file was written through it (under a temporary name first, then renamed).
    assert {p.removesuffix(".tmp") for p in listing.written} == set(on_disk)

    reader = FileSystemReader(str(tmp_path))
    path = dcp_internals.metadata_path(reader)
    assert path == str(tmp_path / dcp_internals.METADATA_FILE)
    assert dcp_internals.metadata_path(reader, rank=3) == str(tmp_path / "__3.metadata")
    data = dcp_internals.read_bytes(reader, path)
    assert data == (tmp_path / ".metadata").read_bytes()
    metadata = dcp_internals.stamp_load_id(reader, pickle.loads(data))
    assert metadata.storage_meta.load_id == reader.load_id
    # The same as DCP's own reading of it.
    theirs = FileSystemReader(str(tmp_path))
    expected = theirs.read_metadata()
    assert metadata.state_dict_metadata == expected.state_dict_metadata
    assert metadata.storage_data == expected.storage_data


def test_dcp_metadata_and_items_are_read_without_code(tmp_path, process_group):
    import torch.distributed.checkpoint as dcp

    from arflow.distributed.dcp_io import SafeFileSystemReader, SafeLoadPlanner

    dcp.save(dcp_state(), checkpoint_id=str(tmp_path / "ok"))
    blank = {"lr": 0.0, "betas": (0.0, 0.0), "params": [""]}
    loaded = {"model": {"w": torch.zeros(2, 3)}, "optim": {"param_groups": [blank]}}
    dcp.load(
        loaded,
        storage_reader=SafeFileSystemReader(str(tmp_path / "ok")),
        planner=SafeLoadPlanner(),
    )
    assert torch.equal(loaded["model"]["w"], dcp_state()["model"]["w"])
    assert loaded["optim"] == {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}]}

    # Every global of a real metadata file is on the allowlist (the load above passed it);
    # one that is not is refused by name.
    bad = tmp_path / "bad"
    dcp.save({"x": argparse.Namespace(a=1)}, checkpoint_id=str(bad))
    # DCP reports a reader's error wrapped, with its text.
    refused = "refusing item x of a DCP checkpoint: it needs arbitrary code to unpickle"
    with pytest.raises(CheckpointException, match=refused):
        dcp.load(
            {"x": None},
            storage_reader=SafeFileSystemReader(str(bad)),
            planner=SafeLoadPlanner(),
        )
    (bad / ".metadata").write_bytes(pickle.dumps(argparse.Namespace()))
    with pytest.raises(UnsafeCheckpointError, match="asks for argparse.Namespace"):
        SafeFileSystemReader(str(bad)).read_metadata()
    assert not dcp_internals.is_metadata_global("argparse", "Namespace")
    assert dcp_internals.is_metadata_global("torch", "bfloat16")


# -------------------------------------------------------------------------- DeepSpeed
def tiny_config(stage: int):
    from arflow.config import config_from_dict

    return config_from_dict(
        {
            "model": TINY_MODEL_CONFIG,
            "train": {"global_batch_size": 2, "micro_batch_size": 2},
            "parallel": {
                "backend": "deepspeed",
                "zero_stage": stage,
                "precision": "fp32",
                "device": "cpu",
            },
        }
    )


def zero_backend(stage: int, info, reshard: bool = False):
    """A DeepSpeed ZeRO-`stage` backend of a tiny model (seed-0 weights) in this process."""
    from arflow.distributed.parallelize import build_backend
    from arflow.models import ARFlow

    cfg = tiny_config(stage)
    torch.manual_seed(0)
    return build_backend(ARFlow(**cfg.model.architecture()), cfg, info, reshard_resume=reshard)


def train_step(backend, seed: int = 0):
    from arflow.flow.transport import training_loss

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 3, 1, 8, 8, generator=g), torch.randint(4, (2,), generator=g)
    torch.manual_seed(100 + seed)
    result = backend.train_step([(x, y)], training_loss, 1e-2)
    assert not result.skipped
    return result


def master_weights(backend) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in backend.gather_full(backend.master_params()).items()}


def assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name].reshape(b[name].shape), b[name]), name
        else:  # summation orders differ between stages; an Adam state off would be ~lr
            torch.testing.assert_close(a[name].reshape(b[name].shape), b[name], rtol=0, atol=1e-6)


def test_zero12_fragments_and_norm_are_deepspeeds(process_group):
    from deepspeed.utils import safe_get_full_fp32_param

    from arflow.internals import deepspeed as ds_internals

    backend = zero_backend(2, process_group)
    result = train_step(backend)
    # The private norm is the step's norm: the engine's public copy after the step.
    norm = ds_internals.global_grad_norm(backend.model.optimizer)
    assert float(norm) == float(backend.model.get_global_grad_norm()) == result.grad_norm.item()
    for name, p in backend.trainable.items():
        fragment = ds_internals.fragment(p)
        # One process owns every parameter whole: its fragment is the full fp32 master.
        assert (fragment.start, fragment.numel) == (0, p.numel()), name
        assert torch.equal(fragment.master, safe_get_full_fp32_param(p).reshape(-1)), name
        # A view into DeepSpeed's own partition, not a copy: the EMA reads it in place.
        with torch.no_grad():
            fragment.master.add_(1.0)
            assert torch.equal(fragment.master, safe_get_full_fp32_param(p).reshape(-1)), name
            fragment.master.sub_(1.0)


def test_zero3_partitions_are_deepspeeds(process_group):
    from deepspeed.utils import safe_get_local_fp32_param

    from arflow.internals import deepspeed as ds_internals
    from arflow.models import ARFlow

    plain = ARFlow(**tiny_config(3).model.architecture())
    shapes = {n: p.shape for n, p in plain.named_parameters() if p.requires_grad}
    backend = zero_backend(3, process_group)
    for name, p in backend.trainable.items():
        part = ds_internals.partition(p)
        assert (part.numel, part.shape) == (shapes[name].numel(), shapes[name]), name
        assert part.local == safe_get_local_fp32_param(p).numel() >= part.numel, name


def test_checkpoint_saves_are_intercepted_and_need_three_classes(tmp_path, process_group):
    from arflow.internals import deepspeed as ds_internals

    backend = zero_backend(2, process_group)
    train_step(backend)
    engine = backend.model
    original = engine.checkpoint_engine
    kept = []
    with ds_internals.saves_intercepted(engine, lambda state, path: kept.append((state, path))):
        engine.save_checkpoint(str(tmp_path), tag="zero", save_latest=False)
    assert engine.checkpoint_engine is original
    # DeepSpeed wrote none of its checkpoint files itself: every one came to us.
    assert sorted((tmp_path / "zero").glob("*.pt")) == []
    files = sorted(path for _, path in kept)
    assert [Path(f).parent for f in files] == [tmp_path / "zero"] * 2  # model, optimizer
    with (
        pytest.raises(RuntimeError, match="boom"),
        ds_internals.saves_intercepted(engine, lambda state, path: None),
    ):
        raise RuntimeError("boom")
    assert engine.checkpoint_engine is original

    # Written as DeepSpeedBackend writes them, DeepSpeed loads them back ...
    for state, path in kept:
        torch.save(state, path)
    engine.load_checkpoint(str(tmp_path), tag="zero")
    # ... and their pickles hold tensors, plain values and exactly DeepSpeed's three classes.
    for path in files:
        load_torch_file(path, ds_internals.PICKLE_CLASSES)
    needed = set()
    for cls in ds_internals.PICKLE_CLASSES:
        others = [c for c in ds_internals.PICKLE_CLASSES if c is not cls]
        for path in files:
            try:
                load_torch_file(path, others)
            except UnsafeCheckpointError:
                needed.add(cls)
    assert needed == set(ds_internals.PICKLE_CLASSES)


def test_universal_checkpoints_cross_the_stage_families(tmp_path, process_group):
    """ZeRO-2 -> ZeRO-3 -> ZeRO-1 through DeepSpeed's universal converter (driven by its own
    argument parser) and the layout fixes of match_universal_stage, in both directions: the
    loaded engine holds the saved fp32 weights, and its next step is the saved engine's next
    step up to rounding (Adam's moments and step count came along: an update is ~lr)."""
    from arflow.internals import deepspeed as ds_internals
    from arflow.storage import FileRecorder

    source = zero_backend(2, process_group)
    train_step(source, 0)
    for step, stage in enumerate((3, 1), start=1):
        folder = tmp_path / f"step{step}"
        source.stage_state(str(folder), None)(FileRecorder(str(folder)), None)
        if step == 1:  # recorded for the converter, which refuses a ZeRO-2 save without it
            states = folder / "zero" / "mp_rank_00_model_states.pt"
            assert "universal_checkpoint_info" in load_torch_file(
                str(states), ds_internals.PICKLE_CLASSES
            )
        loaded = zero_backend(stage, process_group, reshard=True)
        loaded.load_state(str(folder), reshard=True, shared=True)
        assert not (folder / "zero_universal").exists()  # derived data, removed after loading
        assert_same_weights(master_weights(loaded), master_weights(source))
        train_step(source, step)
        train_step(loaded, step)
        assert_same_weights(master_weights(loaded), master_weights(source), exact=False)
        source = loaded


def test_bf16_config_knows_the_overflow_switch():
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    from arflow.internals import deepspeed as ds_internals

    section = DeepSpeedBF16Config(enabled=True, **ds_internals.BF16_NO_OVERFLOW_CHECK)
    assert section.check_grad_overflow is False
    with pytest.raises(ValueError):  # the config refuses keys it does not know
        DeepSpeedBF16Config(enabled=True, no_such_switch=False)


SHM_SCRIPT = """
import os, sys, torch, deepspeed
from arflow.distributed.env import init_distributed, shutdown
from arflow.internals import deepspeed as ds_internals
info = init_distributed("cpu")
model = torch.nn.Linear(4, 4)
deepspeed.initialize(
    model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    config={"train_batch_size": 1},
)
path = ds_internals.shared_memory_path(info.rank)
before = os.path.exists(path)
ds_internals.release_shared_memory_name(info.rank)
print("SHM", path, before, os.path.exists(path))
shutdown()
"""


@pytest.mark.slow
def test_shared_memory_buffer_is_named_as_deepspeed_names_it():
    """DeepSpeed's CPU all-reduce creates its buffer once per process, so a fresh process
    (one rank, all ranks local) starts the engine; the adapter finds the buffer by name and
    unlinks it."""
    from test_export import run_python

    from arflow.distributed.env import free_port

    port = str(free_port())
    rank = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    try:
        out = run_python(SHM_SCRIPT, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **rank)
    finally:  # whatever happened, leave no buffer of this port behind
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)
    lines = [line for line in out.splitlines() if line.startswith("SHM ")]
    assert lines, out[-3000:]
    _, path, before, after = lines[-1].split()
    assert (before, after) == ("True", "False"), path
