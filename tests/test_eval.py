"""arflow.eval end to end, offline: random Inception weights through the real loading code,
a tiny ARFlow, world sizes 1 and 2 (gloo processes) and the ADM `.npz` output."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from random_inception import write_random_weights
from safetensors.torch import save_file
from tiny_models import tiny_model as shared_tiny_model

from arflow.cli import main as arflow
from arflow.cli.evaluate import PROTOCOLS
from arflow.config import EvalConfig, SamplerConfig, config_from_dict, load_config
from arflow.distributed.env import free_port
from arflow.eval import FeatureStats, check_eval_files, evaluate, rank_range, sample_labels
from arflow.eval.inception import InceptionFeatures, cached_weights_path
from arflow.eval.sample_set import ImageGenerator
from arflow.models import ARFlow, architecture_of, save_pretrained
from arflow.models.vae import load_vae
from arflow.utils.images import GAP_GREY, GAP_PX, save_grid

ROOT = Path(__file__).resolve().parents[1]

N = 5  # world size 2 gives ranks 2 and 3 samples; batch 2 leaves a last batch of 1


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return str(write_random_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth"))


def tiny_model() -> ARFlow:
    """The shared random tiny model as a 10-class pixel model of 4x4 patches."""
    return shared_tiny_model(seed=0, patch_size=4, num_classes=10)


def write_reference(tmp: Path) -> None:
    np.savez(tmp / "reference.npz", mu=np.full(2048, 0.1), sigma=np.eye(2048) * 1e-4)


def eval_config(tmp: Path, weights: str, labels: str = "balanced") -> EvalConfig:
    return EvalConfig(
        num_samples=N,
        batch_size=2,
        seed=7,
        labels=labels,
        is_splits=2,
        reference=str(tmp / "reference.npz"),
        inception_weights=weights,
        sampler=SamplerConfig(method="sde", steps=3),
    )


# Output names per label mode: balanced keeps the original names.
SUFFIX = {"balanced": "", "random": "_random"}


def _worker(rank: int, world_size: int, tmp: str, weights: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    try:
        # Statistics of fixed features: each rank adds its share, one all-reduce.
        feats = torch.from_numpy(np.random.default_rng(0).standard_normal((11, 2048)))
        share = rank_range(11, rank, world_size)
        stats = FeatureStats()
        stats.update(feats[share.start : share.stop])
        stats.all_reduce()
        torch.save(stats.buffer, f"{tmp}/stats_{rank}.pt")
        tmp_path = Path(tmp)
        for labels, suffix in SUFFIX.items():
            result = evaluate(
                tiny_model(),
                eval_config(tmp_path, weights, labels),
                device="cpu",
                progress=False,
                save_npz=tmp_path / f"world2{suffix}.npz",
            )
            (tmp_path / f"result{suffix}_{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory, inception_weights):
    tmp = tmp_path_factory.mktemp("world1")
    write_reference(tmp)
    results = {
        labels: evaluate(
            tiny_model(),
            eval_config(tmp, inception_weights, labels),
            device="cpu",
            progress=False,
            save_npz=tmp / f"world1{suffix}.npz",
        )
        for labels, suffix in SUFFIX.items()
    }
    return tmp, results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, inception_weights):
    tmp = tmp_path_factory.mktemp("world2")
    write_reference(tmp)
    mp.spawn(_worker, args=(2, str(tmp), inception_weights), nprocs=2, join=True)
    return tmp, {
        labels: [json.loads((tmp / f"result{suffix}_{r}.json").read_text()) for r in range(2)]
        for labels, suffix in SUFFIX.items()
    }


def eval_section(data: dict) -> EvalConfig:
    return config_from_dict({"eval": data}).eval


def test_config_from_dict_nests_the_sampler_and_rejects_unknown_keys():
    cfg = eval_section({"num_samples": 100, "sampler": {"method": "euler", "steps": 8}})
    assert cfg.sampler == SamplerConfig(method="euler", steps=8) and cfg.num_samples == 100
    assert eval_section(dataclasses.asdict(cfg)) == cfg  # the JSON form round-trips
    with pytest.raises(ValueError, match="eval.num_sample"):
        eval_section({"num_sample": 100})
    with pytest.raises(ValueError, match="eval.sampler.cfg"):
        eval_section({"sampler": {"cfg": 1.5}})
    with pytest.raises(ValueError, match="eval.is_splits"):
        EvalConfig(num_samples=5)


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        InceptionFeatures(str(missing), "cpu")
    (tmp_path / "garbage.pth").write_text("not weights")
    with pytest.raises(ValueError, match="garbage.pth does not hold torch-fidelity InceptionV3"):
        InceptionFeatures(str(tmp_path / "garbage.pth"), "cpu")


def test_missing_cache_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch-fidelity cache

    def offline(url, dst, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = cached_weights_path()
    assert str(expected).startswith(str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures(None, "cpu")
    assert str(expected) in str(err.value) and "--inception-weights" in str(err.value)


def test_whole_pipeline_offline_single_process(single):
    tmp, results = single
    result = results["balanced"]
    assert result["num_samples"] == N
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["inception_score"] >= 1.0
    assert 0 < result["feature_seconds"] <= result["seconds"]
    with np.load(tmp / "world1.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (N, 8, 8, 3)
    assert labels.tolist() == [0, 1, 2, 3, 4]  # round-robin classes
    assert len({im.tobytes() for im in images}) == N and images.std() > 10


def test_sample_set_independent_of_batch_size(single):
    tmp, _ = single
    generator = ImageGenerator(tiny_model(), SamplerConfig(method="sde", steps=3), 7)
    _, images = generator(range(N))  # one batch of 5 instead of 2 + 2 + 1
    with np.load(tmp / "world1.npz") as npz:
        np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), npz["arr_0"])


def test_two_ranks_match_one(single, two_ranks):
    (tmp1, results1), (tmp2, results2) = single, two_ranks
    result1, results2 = results1["balanced"], results2["balanced"]
    assert results2[0] == results2[1]  # identical on every rank
    with np.load(tmp1 / "world1.npz") as a, np.load(tmp2 / "world2.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    for key in ("fid", "inception_score", "inception_score_std", "num_samples"):
        assert results2[0][key] == pytest.approx(result1[key], rel=1e-6, abs=1e-9), key
    # Statistics of the same fixed features: 2 processes + all-reduce == 1 process.
    reduced = [torch.load(tmp2 / f"stats_{r}.pt") for r in range(2)]
    assert torch.equal(reduced[0], reduced[1])
    single_stats = FeatureStats()
    single_stats.update(torch.from_numpy(np.random.default_rng(0).standard_normal((11, 2048))))
    torch.testing.assert_close(reduced[0], single_stats.buffer, rtol=1e-12, atol=1e-12)
    assert not list(tmp2.glob("*.partial"))


def test_random_labels_same_set_on_two_ranks(single, two_ranks):
    """The release's protocol (eval.labels = "random"): labels drawn per sample from (seed,
    index), so 1 and 2 ranks generate the same images and labels and the same scores."""
    (tmp1, results1), (tmp2, results2) = single, two_ranks
    with np.load(tmp1 / "world1_random.npz") as a, np.load(tmp2 / "world2_random.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        labels = a["arr_1"]
    assert labels.tolist() == sample_labels(range(N), 10, "random", seed=7).tolist()
    assert labels.tolist() != list(range(N))  # not the round-robin set
    assert results2["random"][0] == results2["random"][1]
    for key in ("fid", "inception_score", "inception_score_std", "num_samples"):
        expected = results1["random"][key]
        assert results2["random"][0][key] == pytest.approx(expected, rel=1e-6, abs=1e-9), key
    assert results1["random"]["fid"] != pytest.approx(results1["balanced"]["fid"], rel=1e-9)


def test_random_labels_are_uniform_and_keyed_by_seed_and_index():
    everything = sample_labels(range(5000), 10, "random", seed=3)
    counts = np.bincount(everything, minlength=10)
    assert counts.min() > 400 and counts.max() < 600  # 500 each +- 4.5 sigma
    # A sample's label depends on (seed, index) only: any subset, any order, same labels.
    picked = [4999, 17, 2500]
    assert sample_labels(picked, 10, "random", seed=3).tolist() == everything[picked].tolist()
    other_seed = sample_labels(range(5000), 10, "random", seed=4)
    assert (other_seed != everything).mean() > 0.8
    assert sample_labels(range(12), 10, "balanced", seed=3).tolist() == [*range(10), 0, 1]


def save_tiny(path: Path) -> Path:
    """tiny_model() as a self-describing weight file (the trainer's and convert_ckpt's format)."""
    model = tiny_model()
    return save_pretrained(model.state_dict(), path, architecture_of(model))


TIMINGS = ("seconds", "feature_seconds")


def without_timings(result: dict) -> dict:
    """An evaluation's JSON result without its wall-clock fields (the rest is deterministic)."""
    return {k: v for k, v in result.items() if k not in TIMINGS}


def evaluate_args(config: Path, inception_weights: str) -> list[str]:
    """launchers/evaluate.py arguments shared by the tests: config, Inception weights, CPU."""
    return [
        "--config",
        str(config),
        "--inception-weights",
        inception_weights,
        "--device",
        "cpu",
        "--no-progress",
    ]


def test_launcher_evaluates_a_weight_file_or_run_dir(
    tmp_path, inception_weights, single_process_env, capsys
):
    config = {
        "eval": {
            "num_samples": 3,
            "batch_size": 2,
            "is_splits": 1,
            "sampler": {"method": "euler", "steps": 2},
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tiny_model().state_dict(), tmp_path / "plain.safetensors")
    save_tiny(tmp_path / "run" / "ema.safetensors")
    common = [*evaluate_args(tmp_path / "config.json", inception_weights), "--set", "eval.seed=3"]
    with pytest.raises(ValueError, match="convert it with tools/convert_ckpt.py"):
        arflow(["evaluate", "--ckpt", str(tmp_path / "plain.safetensors"), *common])
    out = tmp_path / "result.json"
    arflow(
        [
            "evaluate",
            "--ckpt",
            str(tmp_path / "run" / "ema.safetensors"),
            *common,
            "--out",
            str(out),
        ]
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert (
        printed["num_samples"] == 3 and printed["fid"] is None and printed["inception_score"] >= 1
    )
    # A run directory stands for its ema.safetensors; the architecture comes from the file.
    arflow(["evaluate", "--ckpt", str(tmp_path / "run"), *common])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert without_timings(again) == without_timings(printed)


def test_latent_models_are_decoded_with_the_vae(tmp_path, tiny_vae):
    model = ARFlow(
        input_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=10,
    )
    sampler = SamplerConfig(method="euler", steps=2)
    with pytest.raises(ValueError, match="set eval.vae"):
        ImageGenerator(model, sampler, 0)
    generator = ImageGenerator(model, sampler, 0, vae=load_vae(tiny_vae))
    assert generator.image_shape == (3, 8, 8)  # one 2x upsampling stage
    labels, images = generator(range(3))
    assert labels.tolist() == [0, 1, 2] and images.dtype == torch.uint8
    assert images.shape == (3, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="cannot load a diffusers AutoencoderKL"):
        load_vae(tmp_path / "missing")


def test_vae_module_scale_shapes_and_fp32_decoding(tiny_vae):
    """The one VAE module: the latent scale comes from the VAE's config (a manifest's other
    value is refused), latents are decoded / scale in fp32 even under an autocast."""
    from diffusers import AutoencoderKL

    vae = load_vae(tiny_vae)
    assert vae.scaling_factor == pytest.approx(0.18215) and vae.downsampling == 2
    assert vae.latent_shape(16) == (4, 8, 8) and vae.image_shape(8) == (3, 16, 16)
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
        vae.latent_shape(15)
    load_vae(tiny_vae, scaling_factor=0.18215)  # the manifest agrees
    with pytest.raises(ValueError, match="latent scale mismatch"):
        load_vae(tiny_vae, scaling_factor=0.13025)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = vae.encode_moments(images)
    assert mean.shape == logvar.shape == (2, 4, 8, 8) and logvar.max() <= 20
    reference = AutoencoderKL.from_pretrained(tiny_vae).eval()
    latents = mean * 0.18215
    with torch.no_grad():
        expected = reference.decode(mean).sample
    torch.testing.assert_close(vae.decode(latents), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = vae.decode(latents)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected)
    with pytest.raises(ValueError, match=r"decodes \(B, 4, h, w\) latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_paper_protocol_preset(tmp_path, inception_weights, single_process_env, capsys):
    """--protocol paper / paper-cfg set the release's evaluation; the config's files are kept
    and --set still overrides (here: a tiny run of the same protocol)."""
    cfg = load_config(ROOT / "configs" / "xl_256.json", PROTOCOLS["paper-cfg"])
    assert cfg.eval.num_samples == 50_000 and cfg.eval.labels == "random"
    assert cfg.eval.sampler == SamplerConfig(
        method="sde", steps=250, cfg_scale=1.5, cfg_channels=3, precision="tf32"
    )
    assert cfg.eval.vae and cfg.eval.reference  # still those of the config file
    assert (
        load_config(ROOT / "configs" / "xl_256.json", PROTOCOLS["paper"]).eval.sampler.cfg_scale
        == 1
    )

    save_tiny(tmp_path / "ema.safetensors")
    (tmp_path / "config.json").write_text("{}")
    argv = [
        "--ckpt",
        str(tmp_path / "ema.safetensors"),
        "--config",
        str(tmp_path / "config.json"),
        "--protocol",
        "paper",
        "--inception-weights",
        inception_weights,
        "--device",
        "cpu",
        "--no-progress",
    ]
    with pytest.raises(SystemExit):
        arflow(["evaluate", *argv])  # the protocol writes the ADM .npz: --save-npz is required
    assert "--save-npz" in capsys.readouterr().err
    tiny = ["eval.num_samples=3", "eval.batch_size=3", "eval.is_splits=1", "eval.sampler.steps=2"]
    out = tmp_path / "samples.npz"
    arflow(["evaluate", *argv, "--save-npz", str(out), *[a for t in tiny for a in ("--set", t)]])
    with np.load(out) as npz:
        assert npz["arr_0"].shape == (3, 8, 8, 3)
        assert npz["arr_1"].tolist() == sample_labels(range(3), 10, "random", seed=0).tolist()


def test_missing_eval_files_are_named(tmp_path, inception_weights):
    check_eval_files(EvalConfig(inception_weights=inception_weights))
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        check_eval_files(EvalConfig(inception_weights=str(tmp_path / "nope.pth")))
    missing = str(tmp_path / "ref.npz")
    with pytest.raises(FileNotFoundError, match="ref.npz does not exist"):
        check_eval_files(EvalConfig(inception_weights=inception_weights, reference=missing))


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["inception_weights", "reference", "vae", "vae_channels"])
def test_training_refuses_bad_eval_files_before_the_first_step(tmp_path, tiny_vae, bad):
    """Periodic evaluation files are checked at start (issue: they were found missing only at
    the first evaluation, possibly hours in): missing files, or a VAE whose latents are not the
    model's inputs. eval.every is beyond the run, so nothing but the start-up check can fail."""
    from test_distributed import command, env, tiny_config

    weights = tmp_path / "inception.pth"
    write_random_weights(weights)
    write_reference(tmp_path)
    eval_section = {
        "every": 1000,
        "num_samples": 2,
        "is_splits": 1,
        "inception_weights": str(weights),
        "reference": str(tmp_path / "reference.npz"),
    }
    if bad == "vae_channels":  # a 4-channel VAE for the 1-channel pixel model
        eval_section["vae"] = tiny_vae
        expected = f"eval.vae: the VAE at {tiny_vae} has 4 latent channels"
    else:
        eval_section[bad] = expected = str(tmp_path / f"missing_{bad}")
    cfg = tiny_config(tmp_path, "ddp", train={"steps": 2})
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), eval=eval_section)))
    proc = subprocess.run(
        command("python", 1, cfg), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))  # no step was trained
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or '"loss"' not in metrics.read_text()


def test_trainer_frees_the_gathered_ema_model(tmp_path, single_process_env):
    """The full EMA model gathered for the grid / FID is dropped after the evaluation, so no
    rank keeps a full fp32 copy between evaluations (the sharded EMA exists to avoid it)."""
    import gc

    from test_distributed import tiny_config

    from arflow.distributed.env import init_distributed, shutdown
    from arflow.train import Trainer

    def live_models() -> int:
        gc.collect()
        return sum(type(o) is ARFlow for o in gc.get_objects())

    cfg = load_config(tiny_config(tmp_path, "ddp", train={"steps": 2}))
    info = init_distributed("cpu")
    try:
        trainer = Trainer(cfg, info)
        before = live_models()
        trainer.evaluate()
        assert (tmp_path / "run" / "samples" / "ema_step_000000000.png").exists()
        assert live_models() == before
        trainer.logger.close()
    finally:
        shutdown()


def test_grid_cells_are_enlarged_and_separated(tmp_path):
    from PIL import Image

    images = torch.tensor([50, 100, 150], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 8, 8)
    path = save_grid(images.contiguous(), tmp_path / "grid.png", cols=2)
    with Image.open(path) as png:
        grid = np.asarray(png)
    g = GAP_PX
    assert g >= 2 and GAP_GREY not in (0, 255)  # visible, and unlike black or white strokes
    assert grid.shape == (64 + g + 64, 64 + g + 64)  # 8 px digits enlarged 8x
    assert (grid[:64, :64] == 50).all() and (grid[:64, 64 + g :] == 100).all()
    assert (grid[64 + g :, :64] == 150).all() and (grid[64 + g :, 64 + g :] == 0).all()  # empty
    assert (grid[64 : 64 + g] == GAP_GREY).all() and (grid[:, 64 : 64 + g] == GAP_GREY).all()
    with Image.open(save_grid(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), path)) as png:
        assert png.size == (64 + g + 64, 64)  # 64 px and larger stay as they are


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", ""], "give at least one class id"),
        (["--classes", "1,x"], "comma-separated integers"),
        (["--classes", "1", "--cols", "-2"], "--cols: must be >= 1"),
        (["--classes", "1", "--steps", "0"], "--steps: must be >= 1"),
        (["--classes", "1", "--sampler", "sde", "--steps", "1"], "sampler.steps: must be >= 2"),
        (["--classes", "1", "--cfg-channels", "some"], "sampler settings"),
    ],
)
def test_sample_cli_rejects_bad_arguments_by_name(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        arflow(["sample", "--ckpt", str(tmp_path / "w.safetensors"), "--out", "g.png", *args])
    assert exit_info.value.code == 2  # an argument error, before any file is read
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sample_cli_reads_the_trainers_own_weights(tmp_path, single_process_env, capsys):
    """`arflow sample` takes what a training run leaves: its ema.safetensors, the run
    directory, a checkpoint step directory or the checkpoint root (it used to refuse the first
    and call a directory missing)."""
    from PIL import Image
    from test_distributed import tiny_config

    from arflow.train import run

    run(load_config(tiny_config(tmp_path, "ddp", train={"steps": 2})))
    run_dir = tmp_path / "run"
    step_dir = run_dir / "checkpoints" / "step_000000002"
    for ckpt in (run_dir / "ema.safetensors", run_dir, step_dir, run_dir / "checkpoints"):
        out = tmp_path / f"grid_{ckpt.name}.png"
        args = ["--classes", "0,1,3", "--steps", "3", "--cols", "3", "--device", "cpu"]
        assert arflow(["sample", "--ckpt", str(ckpt), "--out", str(out), *args]) == 0
        with Image.open(out) as png:
            assert png.size == (3 * 64 + 2 * GAP_PX, 64)  # 8 px enlarged to 64
    with pytest.raises(FileNotFoundError, match="do not exist"):
        arflow(["sample", "--ckpt", str(tmp_path / "nope"), "--out", str(out), *args])


@pytest.mark.slow
def test_evaluate_launcher_under_torchrun_matches_one_process(tmp_path, inception_weights):
    """launchers/evaluate.py under torchrun with 2 ranks (each watching for the other's failure)
    writes the same .npz and prints the same scores as one plain process."""
    from test_distributed import env

    save_tiny(tmp_path / "run" / "ema.safetensors")
    config = {"eval": {"num_samples": 4, "batch_size": 2, "is_splits": 1, "seed": 5}}
    config["eval"]["sampler"] = {"method": "euler", "steps": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
        "python": [sys.executable],
    }
    results = {}
    for name, head in launchers.items():
        if name == "torchrun":
            head = [*head, "--master_port", str(free_port())]
        argv = [
            *head,
            str(ROOT / "launchers" / "evaluate.py"),
            "--ckpt",
            str(tmp_path / "run"),
            *evaluate_args(tmp_path / "config.json", inception_weights),
            "--out",
            str(tmp_path / f"{name}.json"),
            "--save-npz",
            str(tmp_path / f"{name}.npz"),
        ]
        proc = subprocess.run(
            argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    two, one = (without_timings(r) for r in results.values())
    assert two.keys() == one.keys() and two["num_samples"] == 4 and two["fid"] is one["fid"] is None
    for key in ("inception_score", "inception_score_std"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    with np.load(tmp_path / "torchrun.npz") as a, np.load(tmp_path / "python.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


BLOCK_EVAL_EXTRAS = """
import sys
# The `eval` and `vae` extras absent: importing any of them raises ImportError.
for name in ("torch_fidelity", "scipy", "diffusers"):
    sys.modules[name] = None
"""


def without_eval_extras(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where the eval and vae extras cannot be imported."""
    from test_distributed import env

    return subprocess.run(
        [sys.executable, "-c", BLOCK_EVAL_EXTRAS + code],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_training_and_sampling_need_no_evaluation_extras(tmp_path):
    """With only the `train` extra (no torch-fidelity, scipy or diffusers), a run trains,
    writes its EMA grid and weights, and launchers/sample.py samples them."""
    from test_distributed import tiny_config

    cfg = tiny_config(tmp_path, "ddp", train={"steps": 2})
    proc = without_eval_extras(f"""
from arflow.config import load_config
from arflow.train import run
assert run(load_config({str(cfg)!r})) == "done"
import runpy
sys.argv = ["sample.py", "--ckpt", {str(tmp_path / "run")!r}, "--classes", "0,1",
            "--steps", "2", "--out", {str(tmp_path / "grid.png")!r}, "--device", "cpu"]
runpy.run_path({str(ROOT / "launchers" / "sample.py")!r}, run_name="__main__")
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "samples" / "ema_step_000000002.png").exists()
    assert (tmp_path / "grid.png").exists()
    # ...and asking for FID without the extra fails at start, naming it.
    with_eval = json.loads(cfg.read_text())
    with_eval["eval"] = {"every": 1000, "num_samples": 2, "is_splits": 1}
    with_eval["run"]["dir"] = str(tmp_path / "run_with_eval")
    cfg.write_text(json.dumps(with_eval))
    proc = without_eval_extras(f"""
from arflow.config import load_config
from arflow.train import run
run(load_config({str(cfg)!r}))
""")
    assert proc.returncode != 0 and "pip install 'arflow[eval]'" in proc.stderr
