"""Multi-process training under the real launchers (2 CPU processes, gloo).

Exact resume: N steps in one run equal k steps, SIGTERM to the running job, `--resume auto`,
N - k steps: identical per-step losses and bitwise-identical final fp32 weights and EMA.
Resharding: a 2-process checkpoint resumes on 1 process with the same weights (every backend
and ZeRO stage). DeepSpeed ZeRO-2 on another world size (2 -> 1, 1 -> 2): fp32 master
weights, Adam moments and EMA after the load equal DeepSpeed's own consolidation of the saved
checkpoint, and training continues; the losses cannot match an uninterrupted run there (each
rank's data and random streams are tied to the world size). A ZeRO stage change on the same
processes continues with exactly the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY_MODEL_CONFIG

from arflow.checkpoint.export import read_trainer_checkpoint
from arflow.distributed.env import free_port
from arflow.models import ARFlow, architecture_of, load_pretrained
from arflow.utils.images import GAP_PX

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(ROOT / "launchers" / "train.py")
BIN = Path(sys.executable).parent
STEPS = 24


def tiny_config(
    tmp: Path, backend: str, zero_stage: int = 2, checkpointing: bool = False, **sections
) -> Path:
    cfg = {
        "run": {"name": f"test-{backend}", "dir": str(tmp / "run"), "seed": 3},
        "model": dict(TINY_MODEL_CONFIG),
        "data": {"url": "synthetic", "seq_len": 3},
        "train": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 4, "schedule": "cosine"},
        "ema": {"decay": 0.9},
        "parallel": {
            "backend": backend,
            "zero_stage": zero_stage,
            "activation_checkpointing": checkpointing,
        },
        "checkpoint": {"every": 1000, "keep_last": 2},
        "logging": {"every": 1, "wandb": False, "progress": False},
        "samples": {"classes": [0, 1], "per_class": 2, "sampler": {"method": "euler", "steps": 3}},
    }
    for key, value in sections.items():
        cfg[key].update(value)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def command(launcher: str, nproc: int, config: Path, *args: str) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        head = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port]
    elif launcher == "torchrun":
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
        ]
    else:
        head = [sys.executable]
    return [*head, LAUNCHER, "--config", str(config), *args]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    if "--master_port" in cmd:  # DeepSpeed's CPU shared-memory buffers must not outlive the job
        port = cmd[cmd.index("--master_port") + 1]
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written while the job runs
            continue
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def run_until_sigterm(cmd: list[str], run_dir: Path, after_step: int, timeout: float = 300) -> str:
    """Start the job, wait until it logged `after_step`, SIGTERM every process of the job (as
    SLURM does on preemption) and wait for it to exit. Returns its output."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not (
            (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= after_step
        ):
            assert proc.poll() is None, (
                f"job ended before step {after_step}:\n{proc.stdout.read()[-6000:]}"
            )
            assert time.monotonic() < deadline, "job too slow"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{name}: {k} differs"


def latest_step(ckpt_dir: Path) -> int:
    return max(
        int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*") if (p / "meta.json").exists()
    )


# ZeRO-2 reads the real digits shards through data-loader workers (whose state is part of the
# exact resume, and which must survive the job-wide SIGTERM); ZeRO-3 and FSDP2 also recompute
# blocks in backward (activation checkpointing), which must not change a single bit either.
CASES = [
    pytest.param("deepspeed", "deepspeed", 2, False, True, id="deepspeed-zero2"),
    pytest.param("deepspeed", "deepspeed", 3, True, False, id="deepspeed-zero3"),
    pytest.param("torchrun", "fsdp2", 2, True, False, id="fsdp2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("launcher,backend,stage,checkpointing,real_data", CASES)
def test_exact_resume_after_sigterm(
    tmp_path, request, launcher, backend, stage, checkpointing, real_data
):
    data = {}
    if real_data:
        data = dict(
            model={"in_channels": 3, "num_classes": 10},
            data={"url": request.getfixturevalue("digits_shards"), "num_workers": 1},
        )
    ref_cfg = tiny_config(tmp_path / "ref", backend, stage, checkpointing, **data)
    run(command(launcher, 2, ref_cfg))
    ref_dir = tmp_path / "ref" / "run"
    reference = losses(ref_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    cfg = tiny_config(tmp_path / "cut", backend, stage, checkpointing, **data)
    run_dir = tmp_path / "cut" / "run"
    out = run_until_sigterm(command(launcher, 2, cfg), run_dir, after_step=5)
    k = latest_step(run_dir / "checkpoints")
    assert 5 <= k < STEPS, out[-3000:]
    assert "SIGTERM received; saved, exiting" in out
    assert not (run_dir / "model.safetensors").exists()  # it stopped early

    proc = run(command(launcher, 2, cfg, "--resume", "auto"))
    assert f"at step {k}" in proc.stdout + proc.stderr
    assert losses(run_dir) == reference  # every step, bit for bit (JSON round-trips floats)
    assert_same_weights(ref_dir, run_dir)
    # The offline reader (tools/convert_ckpt.py) gives the same weights as the run's export.
    for use_ema, name in ((True, "ema"), (False, "model")):
        state, arch, _, step = read_trainer_checkpoint(str(run_dir / "checkpoints"), use_ema)
        assert step == STEPS  # the run's last checkpoint
        exported = load_file(run_dir / f"{name}.safetensors")
        assert arch["depth"] == 2 and state.keys() == exported.keys()
        assert all(torch.equal(state[k], exported[k]) for k in state), name
    assert_converted_model_matches_ema(run_dir, tmp_path / "converted.safetensors")
    if real_data:
        assert_sample_cli_writes_grid(tmp_path / "converted.safetensors", tmp_path / "grid.png")

    # The 2-process checkpoint on one process (DCP resharding / DeepSpeed's universal
    # checkpoint): with nothing left to train, the run exports the weights it loaded.
    step_dir = run_dir / "checkpoints" / f"step_{k:09d}"
    one_cfg = tiny_config(tmp_path / "one", backend, stage, train={"steps": k}, **data)
    run(command("python", 1, one_cfg, "--resume", str(step_dir)))
    loaded = load_file(tmp_path / "one" / "run" / "model.safetensors")
    saved = consolidated_weights(step_dir, backend)
    for name, value in saved.items():
        assert torch.equal(loaded[name], value.float()), name
    ema = load_file(tmp_path / "one" / "run" / "ema.safetensors")
    assert all(torch.equal(ema[n], t) for n, t in load_file(step_dir / "ema.safetensors").items())


def assert_converted_model_matches_ema(run_dir: Path, out: Path) -> None:
    """tools/convert_ckpt.py on the run's checkpoints gives a file that load_pretrained turns into
    a model with the outputs of the training run's own EMA export."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_ckpt.py"),
            str(run_dir / "checkpoints"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    converted = load_pretrained(out)
    reference = ARFlow(**architecture_of(converted)).eval()
    reference.load_state_dict(load_file(run_dir / "ema.safetensors"), strict=True)
    gen = torch.Generator().manual_seed(0)
    size, channels = converted.input_size, converted.in_channels
    x = torch.randn(2, 3, channels, size, size, generator=gen)
    t = torch.rand(2, 3, generator=gen).sort(dim=1).values
    y = torch.tensor([0, 1])
    assert torch.equal(converted(x, t, y), reference(x, t, y))


def assert_sample_cli_writes_grid(ckpt: Path, out: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers" / "sample.py"),
            "--ckpt",
            str(ckpt),
            "--classes",
            "0,1,2,3",
            "--steps",
            "5",
            "--cfg",
            "1.5",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    from PIL import Image

    with Image.open(out) as image:
        # four 8x8 digits on a 2 x 2 grid, each enlarged 8x to 64 px, a gap between cells
        assert image.size == (2 * 64 + GAP_PX, 2 * 64 + GAP_PX)


def consolidated_weights(step_dir: Path, backend: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint, read with the libraries' own offline tools."""
    if backend == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="zero")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir, step_dir.parent / "full.pt")
    return torch.load(step_dir.parent / "full.pt")["model"]


# ---------------------------------------------- DeepSpeed: another world size or ZeRO stage
ZERO_STEPS = 4


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """zero_run(stage, nproc): the run directory of an uninterrupted DeepSpeed run of ZERO_STEPS
    steps checkpointing every 2 steps (made once per module): the source of the resharded
    resumes and the reference for their losses."""
    runs = {}

    def get(stage: int, nproc: int) -> Path:
        if (stage, nproc) not in runs:
            tmp = tmp_path_factory.mktemp(f"zero{stage}-{nproc}proc")
            cfg = tiny_config(
                tmp,
                "deepspeed",
                stage,
                train={"steps": ZERO_STEPS},
                checkpoint={"every": 2, "keep_last": 5},
            )
            run(command("deepspeed" if nproc > 1 else "python", nproc, cfg))
            runs[stage, nproc] = tmp / "run"
        return runs[stage, nproc]

    return get


def universal_state(step_dir: Path, tmp: Path) -> dict[str, dict[str, torch.Tensor]]:
    """DeepSpeed's own consolidation of a ZeRO checkpoint (its universal-checkpoint converter):
    {parameter: {"fp32", "exp_avg", "exp_avg_sq"}} as full tensors."""
    from arflow.distributed.zero import _to_universal

    _to_universal(str(step_dir / "zero"), str(tmp / "universal"))
    out = {}
    for param in (tmp / "universal" / "zero").iterdir():
        if param.is_dir() and (param / "exp_avg.pt").exists():
            loaded = {k: torch.load(param / f"{k}.pt") for k in ("fp32", "exp_avg", "exp_avg_sq")}
            # ZeRO-1/2 sources give {"param": tensor, ...}, ZeRO-3 sources the bare tensor.
            out[param.name] = {
                k: v["param"] if isinstance(v, dict) else v for k, v in loaded.items()
            }
    return out


def resume_and_dump(tmp_path: Path, nproc: int, cfg: Path, step_dir: Path) -> dict:
    """Resume `cfg` from `step_dir` on `nproc` processes through this file's __main__ (the
    state right after the load is dumped, then training goes on); check the fp32 master weights,
    Adam moments and EMA it loaded against DeepSpeed's own consolidation of the checkpoint."""
    dump = tmp_path / "loaded.pt"
    head = command("deepspeed" if nproc > 1 else "python", nproc, cfg)[:-3]
    proc = run([*head, __file__, str(cfg), str(step_dir), str(dump)])
    assert "resumed from" in proc.stdout + proc.stderr
    loaded = torch.load(dump)
    expected = universal_state(step_dir, tmp_path)
    assert loaded["optimizer"].keys() == expected.keys()
    for name, tensors in expected.items():
        for key, value in tensors.items():
            got = loaded["optimizer"][name][key]  # ZeRO-3's universal files are flat
            assert torch.equal(got, value.reshape(got.shape)), f"{name} {key}"
    ema = load_file(step_dir / "ema.safetensors")
    assert all(torch.equal(loaded["ema"][n], ema[n]) for n in loaded["ema"])
    return losses(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)])
def test_zero2_resumes_on_another_world_size(tmp_path, zero_run, saved_on, resumed_on):
    step_dir = zero_run(2, saved_on) / "checkpoints" / "step_000000002"
    cfg = tiny_config(
        tmp_path, "deepspeed", 2, train={"steps": ZERO_STEPS}, checkpoint={"every": 2}
    )
    after = resume_and_dump(tmp_path, resumed_on, cfg, step_dir)
    # It trains on from step 2 (other losses: see the module docstring) and saves.
    assert sorted(after) == [3, 4] and all(torch.isfinite(torch.tensor(list(after.values()))))
    assert latest_step(tmp_path / "run" / "checkpoints") == ZERO_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [(2, 1), (2, 3), (3, 1)])
def test_zero_stage_change_continues(tmp_path, zero_run, saved, resumed):
    """A ZeRO checkpoint continued under another stage on the same 2 processes, within and
    across the ZeRO-1/2 and ZeRO-3 families, gives the uninterrupted run's losses bit for bit
    (the same data, random streams and fp32 arithmetic; only the partitioning differs). This
    also holds the Adam step count: DeepSpeed's ZeRO-3 universal loader shares one step tensor
    between parameter groups, which advanced it once per group per step."""
    reference = zero_run(saved, 2)
    cfg = tiny_config(tmp_path, "deepspeed", resumed, train={"steps": ZERO_STEPS})
    after = resume_and_dump(tmp_path, 2, cfg, reference / "checkpoints" / "step_000000002")
    assert after == {s: v for s, v in losses(reference).items() if s > 2}


@pytest.mark.slow
def test_zero_precision_change_continues(tmp_path, zero_run):
    """A DeepSpeed checkpoint written in fp32 continues under `parallel.precision: bf16`.
    DeepSpeed names and lays out its optimizer files by precision (it used to fail with "No such
    file ... bf16_zero_pp_rank_0 ...", like a damaged checkpoint): the change is detected from
    meta.json's recorded precision and loaded through the universal checkpoint, with the fp32
    master weights, Adam moments and EMA that were saved."""
    reference = zero_run(2, 2)
    cfg = tiny_config(
        tmp_path, "deepspeed", 2, train={"steps": ZERO_STEPS}, parallel={"precision": "bf16"}
    )
    after = resume_and_dump(tmp_path, 2, cfg, reference / "checkpoints" / "step_000000002")
    assert sorted(after) == [3, 4] and all(torch.isfinite(torch.tensor(list(after.values()))))


def _resume_and_dump(config: str, resume: str, out: str) -> None:
    """Under a launcher: resume `config` from `resume`, write the full fp32 master weights,
    Adam moments and EMA right after the load (rank 0, to `out`), then train to the end."""
    import deepspeed

    from arflow.config import load_config
    from arflow.distributed.env import init_distributed, shutdown
    from arflow.train import Trainer

    cfg = load_config(config)
    info = init_distributed("cpu")
    trainer = Trainer(cfg, info, resume)
    optimizer = {}
    for name, p in trainer.backend.trainable.items():
        optimizer[name] = {
            "fp32": deepspeed.utils.safe_get_full_fp32_param(p).cpu(),
            "exp_avg": deepspeed.utils.safe_get_full_optimizer_state(p, "exp_avg").cpu(),
            "exp_avg_sq": deepspeed.utils.safe_get_full_optimizer_state(p, "exp_avg_sq").cpu(),
        }
    ema = {n: t.cpu() for n, t in trainer.ema_model().state_dict().items()}
    if info.is_main:
        torch.save({"optimizer": optimizer, "ema": ema}, out)
    trainer.fit()
    shutdown()


if __name__ == "__main__":
    _resume_and_dump(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
