"""The `arflow` command: light help, shipped configs by name, config errors as one line with
status 2, the `config` listing, the demo's judging step, the missing-extra message, and the
installed command under torchrun and deepspeed."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import tomllib
from test_distributed import BIN, env, losses, tiny_config

from arflow.cli import COMMANDS, OPTIONAL_MODULES, main
from arflow.cli.show_config import describe, field_docs
from arflow.config import (
    MAX_DEPTH,
    MAX_STEP,
    SHIPPED_CONFIGS,
    Config,
    ConfigError,
    load_config,
    shipped_config_names,
)
from arflow.distributed.env import free_port

ROOT = Path(__file__).resolve().parents[1]
HELPS = [[command] for command in COMMANDS] + [
    ["fid", w] for w in ("reference", "stats", "distance")
]

# Run in a fresh interpreter: every --help, then which heavy modules got imported.
HELP_PROBE = """
import contextlib, io, json, sys
from arflow.cli import main
texts = {}
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*argv, "--help"])
    texts[" ".join(argv)] = out.getvalue()
heavy = sorted(m for m in ("torch", "numpy", "deepspeed", "PIL", "sklearn") if m in sys.modules)
print(json.dumps({"texts": texts, "heavy": heavy}))
"""


def test_every_help_imports_nothing_heavy_and_says_what_it_reads_and_writes():
    """`--help` answers at once because no subcommand imports torch (or numpy, deepspeed, ...)
    before it runs: checked by what a fresh interpreter holds after every --help."""
    proc = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, json.dumps([[], *HELPS])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout)
    assert probe["heavy"] == []
    texts = probe["texts"]
    assert all(command in texts[""] for command in COMMANDS)
    for command in COMMANDS:
        text = texts[command]
        assert text.startswith(f"usage: arflow {command}"), text[:200]
        if command != "fid":  # its reads / writes are those of its three subcommands, below
            assert "Reads:" in text and "Writes:" in text, command
    assert "Reads:" in texts["fid"] and "--resolution" in texts["fid reference"]


def test_shipped_configs_are_named_and_the_checkouts_configs_are_the_same_files():
    assert (ROOT / "configs").resolve() == SHIPPED_CONFIGS
    assert shipped_config_names() == ["b_256", "digits_cpu", "xl_128", "xl_256"]
    by_path = load_config(ROOT / "configs" / "xl_256.json", ["train.steps=5"])
    assert load_config("xl_256", ["train.steps=5"]) == by_path
    assert load_config("xl_256.json", ["train.steps=5"]) == by_path
    with pytest.raises(ConfigError, match="xl_265 does not exist .*b_256, digits_cpu, xl_128"):
        load_config("xl_265")


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


BAD_CONFIGS = {  # file name -> (content, what the message must say)
    "directory": (None, "is a directory, not a JSON file"),
    "latin1.json": (b'{"run": {"name": "caf\xe9"}}', r"is not UTF-8 text \(byte 21: b.\\xe9.\)"),
    "deep.json": (f'{{"data": {{"storage_options": {{"x": {deep(100_000)}}}}}}}', "nested deeper"),
    "nested.json": (
        json.dumps({"data": {"storage_options": {"x": json.loads(deep(MAX_DEPTH))}}}),
        rf"^data\.storage_options\.x(\[0\])+: nested deeper than {MAX_DEPTH} levels",
    ),
    "huge_int.json": (
        '{"train": {"steps": 1' + "0" * 5000 + "}}",
        "invalid JSON: Exceeds the limit",
    ),
    "steps.json": (
        json.dumps({"train": {"steps": 10**22}}),
        r"^train\.steps: .* does not fit in a 64-bit integer",
    ),
    "steps_9_digits.json": (
        json.dumps({"train": {"steps": MAX_STEP + 1}}),
        r"^train\.steps: 1,000,000,000 exceeds 999,999,999, the largest step that checkpoint",
    ),
    "every.json": (json.dumps({"checkpoint": {"every": 2 * 10**9}}), r"^checkpoint\.every: 2,000"),
    "list.json": ("[1, 2]", "expected a JSON object at the top, got list"),
}


@pytest.fixture
def bad_configs(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, (content, _) in BAD_CONFIGS.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name] = path
    return paths


@pytest.mark.parametrize("command", ["train", "evaluate", "demo", "config"])
def test_config_errors_are_one_line_naming_the_file_or_key(command, bad_configs, capsys):
    """Every subcommand that reads a config: a directory, bytes that are not UTF-8, nesting
    beyond what json (or the schema) takes, integers beyond 64 bits or beyond the step naming
    -> status 2 and one line, `arflow CMD: config error: <file or key>: ...`."""
    extra = ["--ckpt", "unused.safetensors"] if command == "evaluate" else []
    for name, (_, message) in BAD_CONFIGS.items():
        path = bad_configs[name]
        assert main([command, "--config", str(path), *extra]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        prefix = f"arflow {command}: config error: "
        assert err.startswith(prefix), err
        detail = err.removeprefix(prefix)
        assert re.search(message, detail), (name, detail)
        if not message.startswith("^"):  # not a key: the file is named
            assert str(path) in detail, detail


def test_set_values_are_checked_like_files(capsys):
    assert main(["config", "--set", f"logging.every={MAX_STEP + 1}"]) == 2
    assert "logging.every: 1,000,000,000 exceeds" in capsys.readouterr().err
    assert main(["config", "--set", f"data.storage_options={deep(100_000)}"]) == 2
    assert "data.storage_options: nested deeper" in capsys.readouterr().err
    assert main(["config", "--set", f"train.steps={MAX_STEP}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == MAX_STEP


def test_a_config_error_ends_the_process_with_status_2_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "arflow", "train", "--config", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"arflow train: config error: config file {tmp_path} is a directory, not a JSON file\n"
    )


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_key_of_the_schema_has_a_meaning():
    """The meanings are the schema's attribute docstrings: a key added without one fails here."""
    entries = describe(Config())
    assert [e.key for e in entries if not e.section] == leaf_keys(Config)
    undocumented = [e.key for e in entries if len(e.meaning) < 10]
    assert undocumented == []
    assert field_docs(type(Config().train))["steps"].startswith("Optimizer steps of the run")


def test_config_command_prints_values_defaults_and_meanings(tmp_path, capsys):
    assert main(["config", "--config", "digits_cpu", "--set", "train.steps=7"]) == 0
    text = capsys.readouterr().out
    assert "train.steps = 7    (default 1000)\n    Optimizer steps of the run" in text
    assert "run.seed = 0\n    Seed of the initial weights" in text  # the default: none shown
    assert "\n[eval.sampler]  How the set is sampled." in text
    for key in leaf_keys(Config):
        assert re.search(rf"^{re.escape(key)} = ", text, re.M), key
    # --json prints a config that --config reads back as the same run
    assert main(["config", "--config", "digits_cpu", "--set", "train.steps=7", "--json"]) == 0
    (tmp_path / "resolved.json").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "resolved.json") == load_config("digits_cpu", ["train.steps=7"])
    assert main(["config", "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("digits_cpu  (")


def test_demo_judges_the_run_in_its_directory(tmp_path, capsys):
    """`arflow demo --no-train`: the EMA weights in --run-dir sampled, the grid written and the
    class-consistency measured by the SVM (the training steps are `make demo`'s)."""
    from tiny_models import tiny_model

    from arflow.models import architecture_of, save_pretrained

    model = tiny_model(seed=2, num_classes=10)  # digits-shaped: 3 x 8 x 8, 10 classes
    run = tmp_path / "run"
    save_pretrained(model.state_dict(), run / "ema.safetensors", architecture_of(model))
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "images_per_s": 50.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["demo", "--no-train", "--run-dir", str(run), "--samples", "30", "--steps", "2"]
    assert main([*argv, "--method", "euler"]) == 0
    result = json.loads((run / "digits_demo.json").read_text())
    assert result["samples"] == 30 and result["sampler"] == "euler 2 steps"
    assert 0 <= result["class_consistency"] <= 1 and result["classifier_heldout_accuracy"] > 0.9
    assert (run / "digits_grid.png").stat().st_size > 0
    assert (run / "metrics.png").stat().st_size > 0  # the curves, as `arflow plot` draws them
    assert "class-consistency of 30 EMA samples" in capsys.readouterr().out


def test_a_missing_extra_is_named_with_its_pip_command(tmp_path):
    """The eval extra absent: `arflow fid` says which package and `pip install 'arflow[eval]'`."""
    import numpy as np

    for name in ("a.npz", "b.npz"):
        np.savez(tmp_path / name, mu=np.zeros(4), sigma=np.eye(4))
    code = (
        "import sys\n"
        "sys.modules['torch_fidelity'] = None\n"
        "from arflow.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["fid", "distance", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    expected = (
        "arflow fid: needs torch-fidelity, which is not installed: pip install 'arflow[eval]'"
    )
    assert proc.stderr.strip() == expected


def test_the_base_install_converts_samples_and_explains_configs(tmp_path):
    """With no extra installed (every optional module unimportable), a release checkpoint
    converts, the result samples, and `arflow config` reads a shipped config."""
    import torch
    from tiny_models import tiny_model

    torch.save(tiny_model(seed=1, num_classes=10).state_dict(), tmp_path / "release.pt")
    commands = [
        ["convert", "--from-official", "release.pt", "--out", "m.safetensors"],
        ["sample", "--ckpt", "m.safetensors", "--classes", "0,1", "--steps", "2"]
        + ["--sampler", "euler", "--device", "cpu", "--out", "grid.png"],
        ["config", "--config", "xl_256"],
    ]
    code = (
        "import json, sys\n"
        f"for name in {sorted(OPTIONAL_MODULES)!r}:\n"
        "    sys.modules[name] = None\n"
        "from arflow.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    assert main(argv) == 0, argv\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(commands)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "grid.png").exists() and "train.steps = 400000" in proc.stdout


def test_the_extras_named_in_messages_install_those_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for module, (distribution, extra) in OPTIONAL_MODULES.items():
        names = [re.split(r"[<>=!\[;\s]", req, maxsplit=1)[0] for req in extras[extra]]
        assert distribution in names, (module, extra, names)
    # `all` is every extra but the test tools and flash-attn (compiled against local CUDA).
    in_all = set(extras["all"][0].removeprefix("arflow[").removesuffix("]").split(","))
    assert in_all == set(extras) - {"all", "dev", "flash"}


@pytest.mark.slow
def test_the_installed_command_runs_under_torchrun_and_deepspeed(tmp_path):
    """`torchrun -m arflow train` and `deepspeed --module arflow train` (which puts its
    --local_rank before the subcommand) each train 2 ranks to the end."""
    port = str(free_port())
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--master_port", port]
        + ["--nproc_per_node", "2", "-m", "arflow"],
        "deepspeed": [str(BIN / "deepspeed"), "--master_port", port]
        + ["--num_gpus", "2", "--module", "arflow"],
    }
    for name, head in launchers.items():
        config = tiny_config(tmp_path / name, "ddp", train={"steps": 3})
        proc = subprocess.run(
            [*head, "train", "--config", str(config)],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        run = tmp_path / name / "run"
        assert sorted(losses(run)) == [1, 2, 3] and (run / "ema.safetensors").exists()
