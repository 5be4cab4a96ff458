"""arflow.eval end to end, offline: random Inception weights through the real loading code,
a tiny ARFlow, world sizes 1 and 2 (gloo processes) and the ADM `.npz` output."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from random_inception import write_random_weights
from safetensors.torch import save_file

from arflow.config import EvalConfig, SamplerConfig, config_from_dict
from arflow.distributed.env import free_port
from arflow.eval import FeatureStats, evaluate, rank_range
from arflow.eval.cli import evaluate_main
from arflow.eval.inception import InceptionFeatures, cached_weights_path
from arflow.eval.sample_set import ImageGenerator
from arflow.models import ARFlow
from arflow.models.vae import load_vae

N = 5  # world size 2 gives ranks 2 and 3 samples; batch 2 leaves a last batch of 1


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return str(write_random_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth"))


def tiny_model() -> ARFlow:
    """A few-parameter pixel model whose output depends on label, time and state (the DiT init
    zeroes the adaLN and output layers, which would make every sample its initial noise)."""
    torch.manual_seed(0)
    model = ARFlow(
        input_size=8,
        patch_size=4,
        in_channels=3,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=10,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(0.0, 0.3)
    return model


def write_reference(tmp: Path) -> None:
    np.savez(tmp / "reference.npz", mu=np.full(2048, 0.1), sigma=np.eye(2048) * 1e-4)


def eval_config(tmp: Path, weights: str) -> EvalConfig:
    return EvalConfig(
        num_samples=N,
        batch_size=2,
        seed=7,
        is_splits=2,
        reference=str(tmp / "reference.npz"),
        inception_weights=weights,
        sampler=SamplerConfig(method="sde", steps=3),
    )


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
        result = evaluate(
            tiny_model(),
            eval_config(tmp_path, weights),
            device="cpu",
            progress=False,
            save_npz=tmp_path / "world2.npz",
        )
        (tmp_path / f"result_{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory, inception_weights):
    tmp = tmp_path_factory.mktemp("world1")
    write_reference(tmp)
    result = evaluate(
        tiny_model(),
        eval_config(tmp, inception_weights),
        device="cpu",
        progress=False,
        save_npz=tmp / "world1.npz",
    )
    return tmp, result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, inception_weights):
    tmp = tmp_path_factory.mktemp("world2")
    write_reference(tmp)
    mp.spawn(_worker, args=(2, str(tmp), inception_weights), nprocs=2, join=True)
    return tmp, [json.loads((tmp / f"result_{r}.json").read_text()) for r in range(2)]


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
    tmp, result = single
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
    (tmp1, result1), (tmp2, results2) = single, two_ranks
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


@pytest.fixture
def single_process_env(monkeypatch):
    """The launcher joins a process group from RANK/WORLD_SIZE...; keep that out of os.environ."""
    for key, value in dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    ).items():
        monkeypatch.setenv(key, value)


def test_launcher_evaluates_a_state_dict(tmp_path, inception_weights, single_process_env, capsys):
    save_file(tiny_model().state_dict(), tmp_path / "ema.safetensors")
    config = {
        "model": {
            "name": "ARFlow-S/4",
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "input_size": 8,
            "in_channels": 3,
            "num_classes": 10,
        },
        "eval": {
            "num_samples": 3,
            "batch_size": 2,
            "is_splits": 1,
            "sampler": {"method": "euler", "steps": 2},
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = [
        "--ckpt",
        str(tmp_path / "ema.safetensors"),
        "--config",
        str(tmp_path / "config.json"),
        "--inception-weights",
        inception_weights,
        "--device",
        "cpu",
        "--no-progress",
    ]
    with pytest.raises(ValueError, match="does not fit model ARFlow-S/4"):
        evaluate_main([*argv, "--set", "model.num_classes=11"])
    evaluate_main([*argv, "--set", "eval.seed=3", "--out", str(tmp_path / "result.json")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "result.json").read_text())
    assert (
        printed["num_samples"] == 3 and printed["fid"] is None and printed["inception_score"] >= 1
    )
    # An exported file carries its architecture: the config's model section is not needed.
    from arflow.models import architecture_of, save_pretrained

    model = tiny_model()
    save_pretrained(model.state_dict(), tmp_path / "exported.safetensors", architecture_of(model))
    argv[1] = str(tmp_path / "exported.safetensors")
    evaluate_main([*argv, "--set", "model.num_classes=11", "--set", "eval.seed=3"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    timings = ("seconds", "feature_seconds")
    assert {k: v for k, v in again.items() if k not in timings} == {
        k: v for k, v in printed.items() if k not in timings
    }


def test_latent_models_are_decoded_with_the_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=8,
    ).save_pretrained(tmp_path / "vae")
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
    generator = ImageGenerator(model, sampler, 0, vae=load_vae(tmp_path / "vae"))
    assert generator.image_shape == (3, 8, 8)  # one 2x upsampling stage
    labels, images = generator(range(3))
    assert labels.tolist() == [0, 1, 2] and images.dtype == torch.uint8
    assert images.shape == (3, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="cannot load a diffusers AutoencoderKL"):
        load_vae(tmp_path / "missing")
