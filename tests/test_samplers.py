"""Autoregressive samplers: shapes, seeds, batch independence, guidance, state commits."""

import copy

import pytest
import torch
from tiny_models import assert_rel_close, tiny_model

from arflow.config import Config, ConfigError, config_from_dict
from arflow.flow.samplers import GuidedVelocity, SamplerConfig, sample, sampling_precision

LABELS = torch.tensor([0, 3, 1])
SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


@pytest.mark.parametrize("method", ["sde", "euler", "heun"])
def test_shapes_and_determinism(model, method):
    config = SamplerConfig(method=method, steps=6, cfg_scale=2.0)
    a = sample(model, LABELS, SEEDS, config)
    b = sample(model, LABELS, SEEDS, config)
    assert a.shape == (3, 3, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = sample(model, LABELS, [11, 22, 34], config)
    assert torch.equal(a[:2], c[:2]) and not torch.allclose(a[2], c[2])


@pytest.mark.parametrize("method", ["sde", "heun"])
def test_sample_independent_of_batch_composition(model, method):
    config = SamplerConfig(method=method, steps=6, cfg_scale=1.5)
    together = sample(model, LABELS, SEEDS, config)
    alone = sample(model, LABELS[1:2], SEEDS[1:2], config)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


def test_cfg_scale_one_equals_no_guidance(model):
    plain = sample(model, LABELS, SEEDS, SamplerConfig(steps=6))
    # A scale a hair above 1 runs the batched cond/uncond path and must land on the same images.
    batched = sample(model, LABELS, SEEDS, SamplerConfig(steps=6, cfg_scale=1.0 + 1e-7))
    torch.testing.assert_close(batched, plain, rtol=1e-4, atol=1e-4)
    guided = sample(model, LABELS, SEEDS, SamplerConfig(steps=6, cfg_scale=4.0))
    assert (guided - plain).abs().max() > 1e-2


def test_guidance_on_first_channels_only(model):
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, _ = GuidedVelocity(model, LABELS, SamplerConfig())(x, 0.3, None)
    some, _ = GuidedVelocity(model, LABELS, SamplerConfig(cfg_scale=3.0, cfg_channels=2))(
        x, 0.3, None
    )
    every, _ = GuidedVelocity(model, LABELS, SamplerConfig(cfg_scale=3.0, cfg_channels=None))(
        x, 0.3, None
    )
    torch.testing.assert_close(some[:, 2:], cond[:, 2:], rtol=1e-5, atol=1e-5)
    assert (some[:, :2] - cond[:, :2]).abs().max() > 1e-3
    torch.testing.assert_close(every[:, :2], some[:, :2])
    assert (every[:, 2:] - cond[:, 2:]).abs().max() > 1e-3


class StepRecorder:
    """Wraps model.step to record how many images each call's input state had seen."""

    def __init__(self, model):
        self.model, self.seen = model, []
        self.original = model.step

    def __enter__(self):
        def recording_step(x, t, y, state=None):
            self.seen.append(0 if state is None else state.num_images)
            return self.original(x, t, y, state)

        self.model.step = recording_step
        return self

    def __exit__(self, *exc):
        del self.model.step


def test_heun_commits_the_state_once_per_step(model):
    with StepRecorder(model) as rec:
        sample(model, LABELS, SEEDS, SamplerConfig(method="heun", steps=4))
    assert rec.seen == [0, 0, 1, 1, 2, 2, 3, 3]  # predictor and corrector read the same state


@pytest.mark.parametrize("method, calls", [("sde", 5), ("euler", 5)])
def test_each_step_appends_one_chunk(model, method, calls):
    with StepRecorder(model) as rec:
        sample(model, LABELS, SEEDS, SamplerConfig(method=method, steps=5))
    assert rec.seen == list(range(calls))


def test_sampling_restores_training_mode(model):
    model.train()
    try:
        sample(model, LABELS, SEEDS, SamplerConfig(steps=2))
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="dopri5"), "sampler.method: must be one of"),
        (dict(steps=1), "sampler.steps: must be >= 2"),
        (dict(cfg_scale=-1.0), "sampler.cfg_scale: must be >= 0"),
        (dict(cfg_channels=0), "sampler.cfg_channels: must be >= 1"),
        (dict(last_step_size=1.5), "sampler.last_step_size"),
        (dict(precision="fp16"), "sampler.precision: must be one of"),
    ],
)
def test_bad_sampler_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_seeds_must_match_labels(model):
    with pytest.raises(ValueError, match="3 seeds"):
        sample(model, LABELS[:2], SEEDS)


def test_memory_off_gives_every_step_an_empty_state(model):
    """The SiT baseline's sampler (a model trained on single images): no state is carried."""
    config = SamplerConfig(method="euler", steps=4)
    with StepRecorder(model) as rec:
        memoryless = sample(model, LABELS, SEEDS, config, memory=False)
    assert rec.seen == [0, 0, 0, 0]
    assert (memoryless - sample(model, LABELS, SEEDS, config)).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["hybrid", "causal_softmax"])
def test_euler_steps_equal_the_parallel_forward_over_the_trajectory(attention):
    """Both attentions run through the samplers unchanged: Euler's velocity at step i, read
    through the carried state (d x d state or key/value cache), equals the parallel forward
    over the chunks of steps 0..i at their times, last image."""
    model = tiny_model(seed=4, attention=attention)
    steps = 4
    sampled = sample(model, LABELS, SEEDS, SamplerConfig(method="euler", steps=steps))
    x = torch.stack(
        [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in SEEDS]
    )
    times = torch.linspace(0.0, 1.0, steps + 1).tolist()
    chunks = []
    with torch.no_grad():
        for i in range(steps):
            chunks.append(x)
            t = torch.tensor(times[: i + 1]).expand(len(SEEDS), -1)
            v = model(torch.stack(chunks, dim=1), t, LABELS)[:, -1]
            x = x + (times[i + 1] - times[i]) * v
    assert_rel_close(sampled, x, 1e-5)


def test_one_sampler_settings_type_in_every_section():
    cfg = config_from_dict(
        {
            "samples": {"sampler": {"method": "heun", "steps": 4}},
            "eval": {"sampler": {"cfg_scale": 1.5, "cfg_channels": None}},
        }
    )
    assert cfg.samples.sampler == SamplerConfig(method="heun", steps=4)
    assert cfg.eval.sampler == SamplerConfig(cfg_scale=1.5, cfg_channels=None)
    assert Config().samples.sampler == Config().eval.sampler == SamplerConfig()  # one default
    with pytest.raises(ConfigError, match=r"^samples\.sampler\.steps: must be >= 2"):
        config_from_dict({"samples": {"sampler": {"steps": 1}}})
    with pytest.raises(ConfigError, match=r"^eval\.sampler\.precision: must be one of"):
        config_from_dict({"eval": {"sampler": {"precision": "fp16"}}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast sampling needs CUDA")
def test_bf16_sampling_on_cuda_stays_close_to_fp32(model):
    """precision "auto" samples under bf16 autocast with TF32 on CUDA; the inter-image state
    stays fp32, and the TF32 flags are restored afterwards."""
    cuda_model = copy.deepcopy(model).cuda()
    labels = LABELS.cuda()
    exact = sample(cuda_model, labels, SEEDS, SamplerConfig(steps=20, precision="fp32"))
    fast = sample(cuda_model, labels, SEEDS, SamplerConfig(steps=20, precision="auto"))
    assert not torch.equal(exact, fast)  # the autocast really ran
    assert ((fast - exact).norm() / exact.norm()).item() < 0.05
    flags = torch.backends.cuda.matmul.allow_tf32
    x = torch.randn(3, 3, 8, 8, device="cuda")
    with sampling_precision("auto", torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32
        _, state = GuidedVelocity(cuda_model, labels, SamplerConfig(cfg_scale=1.5))(x, 0.3, None)
    assert torch.backends.cuda.matmul.allow_tf32 == flags
    assert all(layer.dtype == torch.float32 for layer in state.layers)
