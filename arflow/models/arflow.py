"""The ARFlow backbone: a SiT/DiT-style adaLN-Zero transformer over sequences of images.

A training sequence holds S images of one class at different noise levels. Each image is
patchified into N tokens; blocks work on (B, S, N, D). Each image gets its own conditioning
c = y_emb + t_emb(t_s), so adaLN modulates each image with its own noise level. Attention is
hybrid (see hybrid_attention.py): softmax inside an image, a gated linear state across images;
`attention="causal_softmax"` swaps in the paper's ablation, one block-causal softmax across the
images (causal_attention.py).
All images share one fixed 2-D sin-cos position table: order along the sequence is carried by
the noise levels, which the data sorts ascending (noisier first).

Parameter names and shapes follow the public ARFlow release so that its state dicts load with
`strict=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from arflow.config import model_kwargs  # the zoo's named sizes

from .causal_attention import CausalSoftmaxAttention, KVCache
from .hub import HubMixin
from .hybrid_attention import HybridAttention
from .layers import (
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
)

# model.attention -> the attention module of every block
ATTENTIONS = {"hybrid": HybridAttention, "causal_softmax": CausalSoftmaxAttention}


@dataclass(frozen=True)
class ARFlowState:
    """Inter-image memory of the whole model after `num_images` images, one entry per block:
    the (B, H, d, d) fp32 linear-attention state (hybrid), or the KVCache of every earlier token
    (causal_softmax). Returned by `ARFlow.step`; the caller holds it and passes it back."""

    layers: tuple[torch.Tensor | KVCache, ...]
    num_images: int
    batch_size: int


class ARFlowBlock(nn.Module):
    """adaLN-Zero block with hybrid (or block-causal softmax) attention.
    x: (B, S, N, D), c: (B, S, D)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "hybrid"
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(
                f"attention must be one of {tuple(ATTENTIONS)}, got {attention!r} (model.attention)"
            )
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = ATTENTIONS[attention](hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        state: torch.Tensor | KVCache | None = None,
        form: str = "parallel",
    ) -> tuple[torch.Tensor, torch.Tensor | KVCache]:
        """Returns (x (B, S, N, D), the attention's state after the last image)."""
        mod = self.adaLN_modulation(c).unsqueeze(2).chunk(6, dim=-1)  # six (B, S, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        attn, state = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), c, state, form)
        x = x + gate_msa * attn
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, state


class ARFlow(nn.Module, HubMixin):
    """ARFlow velocity model. `forward` trains on whole sequences; `step` samples image by image.

    `attention`: "hybrid" (the paper's model, the release's parameter names) or
    "causal_softmax" (the paper's attention ablation: no gt_proj, a growing key/value cache as
    the sampling state; see causal_attention.py).

    `save_pretrained(dir)`, `ARFlow.from_pretrained(dir or repo id)` and `push_to_hub` read and
    write the Hugging Face Hub format (hub.py); the constructor's keyword arguments are what
    config.json records, so they must stay JSON values.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attention: str = "hybrid",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.attention = attention
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        # A fixed table (filled in initialize_weights), stored as a frozen parameter (not a
        # buffer) so released checkpoints, which contain it, load with strict=True.
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            ARFlowBlock(hidden_size, num_heads, mlp_ratio, attention) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label of the unconditional (CFG) embedding."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT initialisation: the sin-cos positions, xavier linears, zero adaLN and output
        layer (identity blocks). Nothing to do on the meta device (a model built for its shapes,
        or to take a state dict's tensors): most ops on meta tensors run Python decompositions,
        whose first use imports seconds' worth of modules."""
        if self.pos_embed.is_meta:
            return
        grid = self.input_size // self.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)[None])

        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ----------------------------------------------------------------------------- input checks
    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """x: (B, S, C, H, W), t: (B, S), y: (B,); raises ValueError naming what is wrong."""
        if x.ndim != 5:
            raise ValueError(f"x must be (B, S, C, H, W), got shape {tuple(x.shape)}")
        B, S, C, H, W = x.shape
        if self.in_channels != C:
            raise ValueError(
                f"x has {C} channels, the model expects in_channels={self.in_channels}"
            )
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"image size {H}x{W} is not divisible by the patch size {self.patch_size}"
            )
        if self.input_size != H or self.input_size != W:
            raise ValueError(
                f"image size {H}x{W} does not match the model's input_size={self.input_size}"
            )
        if tuple(t.shape) != (B, S):
            raise ValueError(f"t must have shape (B, S) = {(B, S)}, got {tuple(t.shape)}")
        if tuple(y.shape) != (B,):
            raise ValueError(f"y must have shape (B,) = {(B,)}, got {tuple(y.shape)}")
        if y.dtype.is_floating_point:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")

    def check_labels(self, y: torch.Tensor) -> None:
        """y: (B,) -> ValueError unless every label lies in [0, num_classes] (the last is the
        null class). Reads y on the host: one device sync for a GPU tensor."""
        if y.numel() and bool(((y < 0) | (y > self.null_class)).any()):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}] (or {self.null_class}, the null "
                f"class), got values in [{int(y.min())}, {int(y.max())}]"
            )

    # ------------------------------------------------------------------------------- the network
    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """x (B, S, C, H, W), t (B, S), y (B,) -> tokens (B, S, N, D), conditioning (B, S, D)."""
        B, S = x.shape[:2]
        tokens = self.x_embedder(x.flatten(0, 1)) + self.pos_embed
        c = self.y_embedder(y)[:, None] + self.t_embedder(t)
        return tokens.unflatten(0, (B, S)), c

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., N, p*p*C_out) -> (..., C, H, W), dropping the learned-sigma half."""
        p, grid, C = self.patch_size, self.input_size // self.patch_size, self.out_channels
        lead = tokens.shape[:-2]
        x = tokens.reshape(*lead, grid, grid, p, p, C)
        x = x.movedim(-1, -5).movedim(-2, -3)  # (..., C, grid, p, grid, p)
        x = x.reshape(*lead, C, grid * p, grid * p)
        return x[..., : self.in_channels, :, :]

    def run_blocks(self, tokens, c, states, form):
        new_states = []
        for block, state in zip(self.blocks, states):
            tokens, state = block(tokens, c, state, form)
            new_states.append(state)
        return tokens, tuple(new_states)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity for a whole sequence, every attention in its parallel form (the test
        reference with naive attentions is `arflow.models.naive.forward`).

        x: (B, S, C, H, W) images, noisier first; t: (B, S) noise levels in [0, 1] (1 = data);
        y: (B,) class labels -> (B, S, C, H, W).

        Labels on the CPU are range-checked here (free). Labels on an accelerator are not: that
        would be a host sync per call and a graph break under torch.compile; the training data
        boundary checks them instead, and `check_labels` is there for other callers.
        """
        self.check_inputs(x, t, y)
        if y.device.type == "cpu" and not torch.compiler.is_compiling():
            self.check_labels(y)
        tokens, c = self.embed(x, t, y)
        tokens, _ = self.run_blocks(tokens, c, [None] * len(self.blocks), "parallel")
        return self.unpatchify(self.final_layer(tokens, c))

    def step(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, state: ARFlowState | None = None
    ) -> tuple[torch.Tensor, ARFlowState]:
        """One image-chunk through the recurrent form: reads `state` (all earlier chunks; None
        for none) and returns the velocity and the state advanced by this chunk. `state` itself
        is not modified, so an extra evaluation (e.g. Heun's corrector) can reuse it.
        Labels are range-checked when a sequence starts (state None): one host sync per
        sequence, not per step.

        x: (B, C, H, W); t: (B,); y: (B,) -> ((B, C, H, W), ARFlowState).
        """
        if x.ndim != 4 or t.ndim != 1:
            raise ValueError(
                f"step takes x (B, C, H, W) and t (B,), got {tuple(x.shape)} and {tuple(t.shape)}"
            )
        self.check_inputs(x[:, None], t[:, None], y)
        if state is None:
            self.check_labels(y)
            layers, seen = [None] * len(self.blocks), 0
        else:
            if len(state.layers) != len(self.blocks):
                raise ValueError(
                    f"state has {len(state.layers)} layers, the model has {len(self.blocks)} blocks"
                )
            if state.batch_size != x.shape[0]:
                raise ValueError(
                    f"state was built for batch size {state.batch_size}, got a batch of {x.shape[0]}"
                )
            layers, seen = state.layers, state.num_images
        tokens, c = self.embed(x[:, None], t[:, None], y)
        tokens, layers = self.run_blocks(tokens, c, layers, "recurrent")
        v = self.unpatchify(self.final_layer(tokens, c))[:, 0]
        return v, ARFlowState(layers, seen + 1, x.shape[0])


def create_model(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    attention: str = "hybrid",
) -> ARFlow:
    """Build a zoo model, e.g. create_model("ARFlow-XL/2") for 256 px ImageNet latents;
    attention="causal_softmax" builds the paper's attention ablation of the same size."""
    return ARFlow(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        attention=attention,
        **model_kwargs(name),
    )
