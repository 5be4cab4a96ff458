"""The config schema: every shipped config loads, and bad ones fail naming the key."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arflow.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from arflow.distributed.zero import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.json"))


def test_shipped_configs_load_and_validate():
    names = {p.name for p in CONFIGS}
    assert {"xl_256.json", "xl_128.json", "b_256.json", "digits_cpu.json"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        cfg.validate(world_size=2 if path.name == "digits_cpu.json" else 8)


def test_reference_hyperparameters():
    cfg = load_config(ROOT / "configs" / "xl_256.json")
    assert (
        cfg.model.name == "ARFlow-XL/2"
        and cfg.model.input_size == 32
        and cfg.model.in_channels == 4
    )
    assert cfg.data.seq_len == 5
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (1e-4, [0.9, 0.95], 0.02)
    assert cfg.ema.decay == 0.9999
    assert cfg.parallel.precision in ("auto", "bf16")
    for name in ("xl_256.json", "xl_128.json"):  # the release clips by value at 3.0
        train = load_config(ROOT / "configs" / name).train
        assert (train.grad_clip_mode, train.grad_clip) == ("value", 3.0)


@pytest.mark.parametrize(
    "data,key",
    [
        ({"train": {"stepz": 3}}, "train.stepz"),
        ({"modle": {}}, "modle"),
        ({"train": {"steps": "10"}}, "train.steps"),
        ({"train": {"steps": 1.5}}, "train.steps"),
        ({"logging": {"wandb": 1}}, "logging.wandb"),
        ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]"),
        ({"parallel": {"backend": "fsdp1"}}, "parallel.backend"),
        ({"checkpoint": {"dir": 3}}, "checkpoint.dir"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(data, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        config_from_dict(data)


@pytest.mark.parametrize(
    "data,world,key",
    [
        (
            {"train": {"global_batch_size": 48, "micro_batch_size": 32}},
            1,
            "train.global_batch_size",
        ),
        (
            {"train": {"global_batch_size": 64, "micro_batch_size": 16}},
            3,
            "train.global_batch_size",
        ),
        ({"model": {"name": "ARFlow-B/4", "input_size": 30}}, 1, "model.input_size"),
        ({"model": {"name": "ARFlow-Q/2"}}, 1, "model.name"),
        ({"model": {"hidden_size": 100, "num_heads": 3}}, 1, "model.num_heads"),
        ({"parallel": {"zero_stage": 4}}, 1, "parallel.zero_stage"),
        ({"ema": {"decay": 1.0}}, 1, "ema.decay"),
        ({"samples": {"classes": [1000]}}, 1, "samples.classes"),
    ],
)
def test_impossible_combinations_name_the_key(data, world, key):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        config_from_dict(data).validate(world)


def test_overrides_parse_json_values_and_create_nothing_unknown():
    data = apply_overrides(
        {}, ["train.steps=7", "optim.betas=[0.8,0.9]", "run.name=abc", "checkpoint.dir=null"]
    )
    cfg = config_from_dict(data)
    assert cfg.train.steps == 7 and cfg.optim.betas == [0.8, 0.9] and cfg.run.name == "abc"
    assert cfg.checkpoint.dir is None and cfg.checkpoint_dir == "runs/arflow/checkpoints"
    with pytest.raises(ConfigError, match="^train.nope"):
        config_from_dict(apply_overrides({}, ["train.nope=1"]))
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.steps"])


def test_deepspeed_json_is_generated_from_ours():
    cfg = config_from_dict(
        {
            "train": {
                "global_batch_size": 256,
                "micro_batch_size": 16,
                "grad_clip": 0.5,
                "grad_clip_mode": "norm",
            },
            "parallel": {"zero_stage": 3},
        }
    )
    ds = deepspeed_config(cfg, world_size=8, dtype=torch.bfloat16, universal=False)
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    # Clipping by value happens in our optimizer hook: DeepSpeed's (norm) clipping is off.
    cfg.train.grad_clip_mode = "value"
    assert deepspeed_config(cfg, 8, torch.bfloat16, universal=False)["gradient_clipping"] == 0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lr=Infinity"], "optim.lr: must be a finite number, got inf"),
        (["train.grad_clip=Infinity"], "train.grad_clip: must be a finite number"),
        (["ema.decay=NaN"], "ema.decay: must be a finite number"),
        (["optim.eps=NaN"], "optim.eps: must be a finite number"),
        (["optim.betas=[0.9, -Infinity]"], "optim.betas[1]: must be a finite number"),
        (["optim.eps=0"], "optim.eps: must be > 0"),
        (["run.seed=-1"], "run.seed: must be >= 0"),
        (["parallel.collective_timeout_s=0"], "parallel.collective_timeout_s: must be > 0"),
        (
            ["data.url=data/x", "data.num_workers=8", "train.micro_batch_size=4"],
            "data.num_workers: 8 loader workers",
        ),
    ],
)
def test_numbers_out_of_range_name_the_key(overrides, message):
    """Infinity / NaN (which JSON and --set accept) and out-of-range numbers fail at load time,
    before anything is built, not steps later."""
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        config_from_dict(apply_overrides({}, overrides)).validate(1)


def test_launcher_rejects_a_bad_config_before_any_work(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": {"global_batch_size": 10, "micro_batch_size": 4}}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "train.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "config error: train.global_batch_size" in proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers" / "train.py"),
            "--config",
            str(path),
            "--set",
            "train.micro_batch_size=5",
            "--set",
            "model.depht=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "config error: model.depht: unknown key" in proc.stderr


def test_default_config_is_a_valid_config():
    assert isinstance(Config().validate(1), Config)
