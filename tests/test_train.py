"""The trainer end to end: DDP and ZeRO-1 under the real launchers, observability (metrics.jsonl,
wandb offline run, EMA sample grid), a save killed before its commit, a shape-changing resume,
and non-finite losses (skipped, counted, then a clear stop that leaves the last checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import command, latest_step, losses, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, env, expect_ok=True, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def clean_env(tmp_path: Path) -> dict:
    """No wandb credentials and no WANDB_MODE: the run must fall back to offline by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return dict(env, HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.slow
def test_ddp_observability_interrupted_save_and_shape_change(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "ddp",
        train={"steps": 6},
        checkpoint={"every": 3, "keep_last": 3},
        logging={"every": 2, "wandb": True, "progress": True},
    )
    env = clean_env(tmp_path)
    proc = run(command("torchrun", 2, cfg), env)
    run_dir = tmp_path / "run"

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for key in (
        "loss",
        "grad_norm",
        "lr",
        "images_per_s",
        "tokens_per_s",
        "step_time_s",
        "peak_memory_gb",
    ):
        assert all(isinstance(r[key], float) for r in steps), key
    assert any("checkpoint_seconds" in r for r in records)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and any(p.suffix == ".wandb" for p in offline[0].iterdir())
    assert (run_dir / "samples" / "ema_step_000000006.png").exists()
    assert (run_dir / "model.safetensors").exists() and (run_dir / "ema.safetensors").exists()
    assert "img/s" in proc.stderr  # the rank-0 progress bar

    # A save killed before its commit: files written, no meta.json. Resume must ignore and
    # remove it and continue from the previous complete checkpoint.
    ckpt = run_dir / "checkpoints"
    (ckpt / "step_000000006" / "meta.json").unlink()
    shutil.copytree(
        ckpt / "step_000000003", ckpt / "step_000000009", ignore=shutil.ignore_patterns("meta.json")
    )
    proc = run(command("torchrun", 2, cfg, "--resume", "auto", "--set", "train.steps=5"), env)
    out = proc.stdout + proc.stderr
    assert "removed incomplete checkpoints at steps [6, 9]" in out
    assert "resumed from" in out and "step_000000003 at step 3" in out
    assert latest_step(ckpt) == 5

    # A config that changes parameter shapes cannot resume; the message names the key.
    proc = run(
        command("python", 1, cfg, "--resume", "auto", "--set", "model.hidden_size=64"),
        env,
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert "model.hidden_size: checkpoint 32, config 64" in proc.stderr


@pytest.mark.slow
def test_zero1_under_deepspeed(tmp_path):
    cfg = tiny_config(tmp_path, "deepspeed", zero_stage=1, train={"steps": 4})
    env = clean_env(tmp_path)
    env["WANDB_MODE"] = "disabled"
    run(command("deepspeed", 2, cfg), env)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert latest_step(tmp_path / "run" / "checkpoints") == 4


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_nonfinite_steps_are_skipped_then_stop(tmp_path, backend):
    cfg = tiny_config(
        tmp_path,
        backend,
        train={
            "steps": 20,
            "global_batch_size": 2,
            "micro_batch_size": 2,
            "max_nonfinite_steps": 3,
        },
        checkpoint={"every": 2, "keep_last": 10},
    )
    proc = run(
        [sys.executable, __file__, str(cfg)], clean_env(tmp_path) | {"WANDB_MODE": "disabled"}
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "3 consecutive non-finite steps" in result["error"]
    assert "train.max_nonfinite_steps = 3" in result["error"]
    # Batches 4, 7, 8 and 9 are poisoned: those steps change nothing, step 5 trains again.
    assert result["skipped"] == [4, 7, 8, 9]
    assert result["changed"] == [1, 2, 3, 5, 6]
    # The run stopped at step 9 without saving: step 8 (weights of step 6) stays the latest.
    assert latest_step(tmp_path / "run" / "checkpoints") == 8
    assert not (tmp_path / "run" / "checkpoints" / "step_000000009").exists()
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["skipped_steps"] for r in records if "skipped_steps" in r][
        -1
    ] == 3  # logged at step 8


def _poisoned_run(config_path: str) -> None:
    """Run the trainer in this process with NaN images in chosen batches; print the outcome."""
    import torch

    from arflow.config import load_config
    from arflow.distributed.env import init_distributed
    from arflow.train import NonFiniteLossError, Trainer

    cfg = load_config(config_path)
    info = init_distributed("cpu")
    trainer = Trainer(cfg, info)
    bad = {3, 6, 7, 8}  # 0-based batch indices: steps 4, 7, 8, 9

    class Poisoned:
        def __init__(self, inner):
            self.inner = inner

        def state_dict(self):
            return self.inner.state_dict()

        def close(self):
            self.inner.close()

        @property
        def bad_samples(self):
            return self.inner.bad_samples

        def __iter__(self):
            for i, (x, y) in enumerate(self.inner):
                yield (x * float("nan") if i in bad else x), y

    trainer.loader = Poisoned(trainer.loader)

    def snapshot():
        return [t.detach().clone() for t in trainer.backend.master_params().values()] + [
            t.detach().clone() for t in trainer.ema.shadow.values()
        ]

    # State before each step (master weights and EMA, i.e. after the previous step's EMA update).
    states, skipped_flags = [], []
    step_fn = trainer.backend.train_step

    def spy(*args, **kwargs):
        states.append(snapshot())
        result = step_fn(*args, **kwargs)
        skipped_flags.append(result.skipped)
        return result

    trainer.backend.train_step = spy
    history = {"skipped": [], "changed": []}
    try:
        trainer.fit()
        history["error"] = ""
    except NonFiniteLossError as e:
        history["error"] = str(e)
    finally:
        torch.distributed.destroy_process_group()
    states.append(snapshot())
    for i, flag in enumerate(skipped_flags):
        unchanged = all(torch.equal(a, b) for a, b in zip(states[i], states[i + 1]))
        if flag or unchanged:
            assert flag and unchanged, f"step {i + 1}: skipped={flag} but unchanged={unchanged}"
            history["skipped"].append(i + 1)
        else:
            history["changed"].append(i + 1)
    print(json.dumps(history))


if __name__ == "__main__":
    _poisoned_run(sys.argv[1])


@pytest.mark.slow
def test_periodic_fid_inside_training(tmp_path):
    """eval.every runs the distributed FID/IS on the EMA model across both ranks; the results
    land in metrics.jsonl at every evaluation step."""
    import numpy as np
    from random_inception import write_random_weights

    weights = write_random_weights(tmp_path / "inception.pth")
    np.savez(tmp_path / "reference.npz", mu=np.full(2048, 0.1), sigma=np.eye(2048) * 1e-4)
    cfg_path = tiny_config(
        tmp_path, "ddp", train={"steps": 4}, logging={"every": 2, "wandb": False}
    )
    cfg = json.loads(cfg_path.read_text())
    cfg["eval"] = {
        "every": 2,
        "num_samples": 4,
        "batch_size": 2,
        "is_splits": 1,
        "sampler": {"method": "euler", "steps": 2},
        "reference": str(tmp_path / "reference.npz"),
        "inception_weights": str(weights),
    }
    cfg_path.write_text(json.dumps(cfg))
    run(command("torchrun", 2, cfg_path), clean_env(tmp_path))
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in records if "eval/fid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval/fid"] > 0 and r["eval/inception_score"] >= 1 and r["eval/num_samples"] == 4
