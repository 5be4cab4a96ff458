"""The ARFlow backbone: forms agree end to end for both attentions, causality, zoo,
release-compatible state dicts, input validation, a forward that compiles as one graph, and a
loss that falls."""

import io

import pytest
import torch
from tiny_models import assert_rel_close, sequence, tiny_model

from arflow.flow.transport import training_loss
from arflow.models import MODEL_NAMES, ARFlow, create_model, model_kwargs, naive
from arflow.models.causal_attention import KVCache

ATTENTIONS = ["hybrid", "causal_softmax"]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_shapes_and_forms_agree(attention):
    model = tiny_model(attention=attention)
    x, t, y = sequence(images=4)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert_rel_close(out, naive.forward(model, x, t, y), 1e-5, "parallel vs naive")
    # Image by image through `step`, the samplers' interface: the state carried between calls
    # is the d x d state (hybrid) or a key/value cache that grows by one image (causal).
    state, steps = None, []
    for s in range(x.shape[1]):
        v, state = model.step(x[:, s], t[:, s], y, state)
        steps.append(v)
        assert state.num_images == s + 1 and state.batch_size == x.shape[0]
        layer = state.layers[0]
        if attention == "causal_softmax":
            assert isinstance(layer, KVCache) and layer.k.shape[2] == (s + 1) * 16
        else:
            assert layer.shape == (2, 2, 16, 16)
    assert_rel_close(torch.stack(steps, dim=1), out, 1e-5, "step by step vs parallel")


def test_the_two_attentions_differ_only_by_gt_proj():
    hybrid, causal = tiny_model(), tiny_model(attention="causal_softmax")
    gates = {k for k in hybrid.state_dict() if "gt_proj" in k}
    assert gates == {"blocks.0.attn.gt_proj.weight", "blocks.1.attn.gt_proj.weight"}
    assert set(causal.state_dict()) == set(hybrid.state_dict()) - gates
    x, t, y = sequence()
    assert not torch.allclose(hybrid(x, t, y), causal(x, t, y))


def test_unknown_attention_is_named():
    with pytest.raises(ValueError, match=r"attention must be one of .*'linear'.*model.attention"):
        tiny_model(attention="linear")


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_compiles_as_one_graph(attention):
    """No graph break (hence no host sync) in the training forward, labels on any device."""
    torch._dynamo.reset()
    model = tiny_model(attention=attention).train()
    x, t, y = sequence(images=3)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    outputs, grads = [], []
    # Compiled and eager, the same outputs and gradients.
    for run in (compiled, model):
        torch.manual_seed(0)  # label dropout draws from the global generator
        out = run(x, t, y)
        model.zero_grad()
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(outputs[0], outputs[1])
    for compiled_grad, eager_grad in zip(*grads):
        assert_rel_close(compiled_grad, eager_grad, 1e-5)


def test_step_checks_labels_when_a_sequence_starts():
    model = tiny_model()
    x, t, y = sequence()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\].*got values in \[0, 6\]"):
        model.step(x[:, 0], t[:, 0], torch.tensor([0, 6]))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_model_is_causal_across_images(attention):
    model = tiny_model(attention=attention)
    x, t, y = sequence(images=4)
    base = model(x, t, y)
    x2, t2 = x.clone(), t.clone()
    x2[:, 2] = torch.randn_like(x2[:, 2])
    t2[:, 2] = 0.5
    out = model(x2, t2, y)
    assert torch.equal(out[:, :2], base[:, :2])
    assert (out[:, 3] - base[:, 3]).abs().max() > 1e-3


def count_params(name: str, input_size=32, channels=4, classes=1000) -> int:
    """Closed-form trainable-parameter count of a zoo model (release layout)."""
    k = model_kwargs(name)
    p, D, depth, heads = k["patch_size"], k["hidden_size"], k["depth"], k["num_heads"]
    patch = channels * p * p * D + D
    t_emb = 256 * D + D + D * D + D
    y_emb = (classes + 1) * D
    attn = 5 * D * D + D * heads
    mlp = D * 4 * D + 4 * D + 4 * D * D + D
    ada = D * 6 * D + 6 * D
    final = D * p * p * 2 * channels + p * p * 2 * channels + D * 2 * D + 2 * D
    return patch + t_emb + y_emb + depth * (attn + mlp + ada) + final


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count_params(name)
    if name == "ARFlow-XL/2":
        assert trainable == 712_445_216  # the published figure


def test_release_parameter_names():
    model = tiny_model(depth=1)
    expected = {
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc2.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.0.adaLN_modulation.1.weight",
        "blocks.0.adaLN_modulation.1.bias",
    } | {f"blocks.0.attn.{n}_proj.weight" for n in ("q", "k", "v", "g", "gt", "out")}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["blocks.0.attn.gt_proj.weight"].shape == (2, 32)
    assert model.state_dict()["y_embedder.embedding_table.weight"].shape == (6, 32)


def test_state_dict_from_another_seed_loads_strictly():
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    x, t, y = sequence()
    assert not torch.allclose(source(x, t, y), target(x, t, y))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(source(x, t, y), target(x, t, y))


def test_learn_sigma_half_is_dropped():
    with_sigma = tiny_model(learn_sigma=True)
    assert with_sigma.final_layer.linear.out_features == 2 * 2 * 2 * 3
    x, t, y = sequence()
    assert with_sigma(x, t, y).shape == x.shape


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, t, y: (x[:, :, :2], t, y), "2 channels, the model expects in_channels=3"),
        (lambda x, t, y: (x[..., :7, :7], t, y), "not divisible by the patch size 2"),
        (lambda x, t, y: (x[..., :6, :6], t, y), "does not match the model's input_size=8"),
        (lambda x, t, y: (x, t, torch.tensor([0, 7])), r"labels must lie in \[0, 4\]"),
        (lambda x, t, y: (x, t, torch.tensor([-1, 0])), r"labels must lie in \[0, 4\]"),
        (lambda x, t, y: (x, t[:, :2], y), r"t must have shape \(B, S\) = \(2, 4\)"),
        (lambda x, t, y: (x, t[:, :, None], y), r"t must have shape"),
        (lambda x, t, y: (x[0], t, y), r"x must be \(B, S, C, H, W\)"),
    ],
)
def test_bad_inputs_are_named(change, message):
    model = tiny_model()
    x, t, y = sequence()
    with pytest.raises(ValueError, match=message):
        model(*change(x, t, y))


def test_step_rejects_state_of_another_batch_size():
    model = tiny_model()
    x, t, y = sequence(batch=2)
    _, state = model.step(x[:, 0], t[:, 0], y)
    with pytest.raises(ValueError, match="batch size 2, got a batch of 1"):
        model.step(x[:1, 1], t[:1, 1], y[:1], state)


def test_unknown_zoo_name():
    with pytest.raises(ValueError, match="unknown model 'ARFlow-M/2'"):
        create_model("ARFlow-M/2")


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ARFlow(
        input_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=5,
    ).train()
    x1, _, y = sequence(batch=4, images=3, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        gen = torch.Generator().manual_seed(0)  # the same noise levels and noise every step
        loss = training_loss(model, x1, y, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10, losses[::15]
