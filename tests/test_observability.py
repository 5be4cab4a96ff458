"""What a run shows of itself: the data-wait fraction, achieved FLOP/s and MFU in every log row,
TensorBoard event files (appended across a resume), the profiler window's trace, the FLOP
formula against torch's own count, and the plot of metrics.jsonl. Real in-process training runs
on the CPU (one-process gloo group)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_distributed import tiny_config
from tiny_models import TINY_MODEL_CONFIG

from arflow.config import ModelConfig
from arflow.utils.flops import peak_flops, train_flops_per_image

TINY_FLOPS = train_flops_per_image(ModelConfig(**TINY_MODEL_CONFIG).architecture(), 3)
SCALARS = ("loss", "grad_norm", "lr", "images_per_s", "data_wait_fraction", "tflops_per_device")


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def fit(config: Path, process_group, resume: str | None = None) -> None:
    from arflow.config import load_config
    from arflow.train import Trainer

    assert Trainer(load_config(config), process_group, resume).fit() == "done"


def tensorboard(run_dir: Path):
    """The run's TensorBoard events, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    return events.Reload()


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = tensorboard(run_dir)
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_log_rows_tensorboard_and_profile_window(tmp_path, process_group):
    peak_tflops = 1e-4  # a peak the tiny CPU run reaches a sizeable share of
    cfg = tiny_config(
        tmp_path,
        "ddp",
        train={"steps": 6, "profile": {"start": 3, "steps": 2}},
        logging={"every": 2, "peak_tflops": peak_tflops},
        checkpoint={"every": 0},
    )
    fit(cfg, process_group)
    run_dir = tmp_path / "run"

    logged = rows(run_dir)
    assert [r["step"] for r in logged] == [2, 4, 6]
    for r in logged:
        assert 0 <= r["data_wait_fraction"] <= 1, r
        assert r["tflops_per_device"] > 0, r
        # Achieved FLOP/s: the model FLOPs of the step's 8 sequences of 3 images per step time.
        assert r["tflops_per_device"] == pytest.approx(
            TINY_FLOPS * 8 * 3 / r["step_time_s"] / 1e12, rel=1e-9
        )
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / peak_tflops, rel=1e-9)

    # TensorBoard: every logged scalar under its metrics.jsonl name, at the logged steps.
    tb = scalars(run_dir)
    for key in (*SCALARS, "mfu"):
        assert [step for step, _ in tb[key]] == [2, 4, 6], key
        assert [v for _, v in tb[key]] == pytest.approx([r[key] for r in logged], rel=1e-6), key
    (grid,) = tensorboard(run_dir).Images("ema_samples")  # the final EMA sample grid
    assert grid.step == 6 and grid.width > 0 and grid.height > 0

    # The profile window: one trace of this rank, spanning steps 3 and 4 exactly.
    traces = list((run_dir / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    spans = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert len(spans) == 2, spans
    assert any(e.get("name") == "aten::scaled_dot_product_attention" for e in events)


def test_no_mfu_without_a_peak_and_tensorboard_appends_on_resume(tmp_path, process_group):
    """On a CPU with no logging.peak_tflops the rows carry TFLOP/s but no MFU. A resume from an
    earlier checkpoint than the last logged step adds an event file, and TensorBoard shows each
    step once: the replayed steps' values are the second run's."""
    cfg = tiny_config(tmp_path, "ddp", train={"steps": 4}, checkpoint={"every": 2, "keep_last": 5})
    fit(cfg, process_group)
    run_dir = tmp_path / "run"
    assert all("mfu" not in r and r["tflops_per_device"] > 0 for r in rows(run_dir))
    assert not (run_dir / "profile").exists()  # no window configured

    shutil.rmtree(run_dir / "checkpoints" / "step_000000004")  # as if the run died after step 4
    config = json.loads(cfg.read_text())
    config["train"]["steps"] = 6
    config["optim"]["lr"] = 3e-3  # replayed steps then differ from the first run's
    cfg.write_text(json.dumps(config))
    fit(cfg, process_group, resume="auto")

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    logged = {r["step"]: r["loss"] for r in rows(run_dir)}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    tb = scalars(run_dir)["loss"]
    assert [step for step, _ in tb] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in tb] == pytest.approx([logged[s] for s in range(1, 7)], rel=1e-6)


@pytest.mark.parametrize("attention", ["hybrid", "causal_softmax"])
def test_flop_formula_matches_torch_flop_counter(attention):
    """The formula against torch's FlopCounterMode on a forward + backward of one sequence
    (SDPA's math path, which the counter sees). The block-causal ablation's SDPA also computes
    the masked scores; model FLOPs leave those out, so they are added here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from arflow.flow.transport import training_loss
    from arflow.models import ARFlow

    depth, D, size, patch, n = 2, 64, 16, 2, 4
    arch = dict(
        patch_size=patch,
        depth=depth,
        hidden_size=D,
        num_heads=4,
        input_size=size,
        in_channels=4,
        num_classes=10,
        learn_sigma=True,
        class_dropout_prob=0.1,
        attention=attention,
    )
    torch.manual_seed(0)
    model = ARFlow(**arch)
    counter = FlopCounterMode(display=False)
    x, y = torch.randn(1, n, 4, size, size), torch.zeros(1, dtype=torch.long)
    with counter, sdpa_kernel(SDPBackend.MATH):
        training_loss(model, x, y).backward()
    counted = counter.get_total_flops() / n
    N = (size // patch) ** 2
    masked = 3 * 2 * depth * (2 * N * n * N * D - (n + 1) * N * N * D)
    expected = counted - (masked if attention == "causal_softmax" else 0)
    assert train_flops_per_image(arch, n) == pytest.approx(expected, rel=0.01)


def test_peak_by_device_name_and_precision():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None  # no tensor-core peak: config
    assert peak_flops("NVIDIA GeForce GTX 1080", "bf16") is None


def test_plot_of_a_metrics_file(tmp_path):
    """A PNG of the documented size, with a panel per logged metric (FID included)."""
    from PIL import Image

    from arflow.utils.plot_metrics import figure_size, panels_of, plot_metrics, read_metrics

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = []
    for step in range(10, 510, 10):
        lines.append(
            {
                "step": step,
                "loss": 2.0 / step**0.3,
                "grad_norm": 5.0 / step**0.5,
                "lr": 1e-3,
                "images_per_s": 900.0 + step % 70,
                "data_wait_fraction": 0.02,
                "tflops_per_device": 0.01,
            }
        )
        if step % 100 == 0:
            lines.append({"step": step, "eval/fid": 300.0 / step, "eval/inception_score": 2.0})
            lines.append({"step": step, "checkpoint_seconds": 0.5})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 500, "lo'  # a cut-off line
    (run_dir / "metrics.jsonl").write_text(text)

    panels = panels_of(read_metrics(run_dir / "metrics.jsonl"))
    assert [p.key for p, _, _ in panels] == [
        "loss",
        "grad_norm",
        "lr",
        "images_per_s",
        "data_wait_fraction",
        "tflops_per_device",
        "eval/fid",
        "eval/inception_score",
    ]
    out = plot_metrics(run_dir)
    assert out == run_dir / "metrics.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == figure_size(8) == (1500, 1050)


def test_plot_names_what_is_missing(tmp_path):
    from arflow.utils.plot_metrics import plot_metrics

    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        plot_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "checkpoint_seconds": 1.0}))
    with pytest.raises(ValueError, match="holds no training metrics"):
        plot_metrics(tmp_path)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.profile.start=0", "train.profile.start: must be >= 1, got 0"),
        ("train.profile.steps=-1", "train.profile.steps: must be >= 0, got -1"),
        ("train.profile.stepz=1", "train.profile.stepz: unknown key"),
        ("logging.peak_tflops=0", "logging.peak_tflops: must be null or > 0"),
        ("logging.tensorboard=1", "logging.tensorboard: expected true/false"),
    ],
)
def test_observability_keys_name_what_is_wrong(override, message):
    from arflow.config import ConfigError, apply_overrides, config_from_dict

    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        config_from_dict(apply_overrides({}, [override])).validate(1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_logs_mfu_and_profiles_kernels_and_memory(tmp_path):
    """On a listed GPU the rows carry MFU from the device's bf16 peak; the profile window
    traces CUDA kernels and writes the allocator's history for the same steps."""
    import pickle

    from test_distributed import command, run

    cfg = tiny_config(
        tmp_path,
        "ddp",
        train={"steps": 4, "profile": {"start": 2, "steps": 2}},
        parallel={"device": "cuda", "precision": "bf16", "compile": False},
        logging={"every": 2, "tensorboard": False},
        checkpoint={"every": 0},
    )
    run(command("python", 1, cfg))
    run_dir = tmp_path / "run"
    name = torch.cuda.get_device_name()
    for r in rows(run_dir):
        if peak_flops(name, "bf16") is not None:
            assert 0 < r["mfu"] < 1, (name, r)
        assert 0 <= r["data_wait_fraction"] <= 1 and r["tflops_per_device"] > 0, r
    (trace,) = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events), "no CUDA kernel in the trace"
    (memory,) = (run_dir / "profile").glob("rank0_memory_steps_2-3.pickle")
    snapshot = pickle.loads(memory.read_bytes())
    assert snapshot["segments"] and any(snapshot["device_traces"]), snapshot.keys()


def test_plot_command_and_script(tmp_path, capsys):
    """`arflow plot RUN_DIR` (and tools/plot_metrics.py over it) writes the PNG; a run directory
    without metrics is a one-line usage error."""
    from arflow.cli import main

    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "arflow plot: error:" in capsys.readouterr().err
