"""Model FLOPs of a training step and the accelerator peaks that turn them into MFU.

MFU (model FLOPs utilisation) = model FLOPs of the images trained per second / the devices'
peak. Model FLOPs are counted from the architecture, not measured: recomputation (activation
checkpointing) and padding are not counted, as MFU conventions have it.

FLOPs of one training image: 3 x forward (backward = 2 x forward), forward multiply-adds x 2,
for depth L, width D, heads H (head size d = D / H), N tokens per image, n images per
sequence, patch p, C input / C_out output channels:

    per block, per token    13 D^2 + D H        (q, k, v, gate, out: 5 D^2; MLP 8 D^2; decay D H)
    per block, per image    2 N^2 D             (softmax inside the image: q k^T and p v)
                            + 2 N D d + n D d   (inter-image: k^T v, q H_s, the state scan)
                            + 6 D^2 + D H       (adaLN from the conditioning, decay of c)
    embeddings and head     N p^2 C D + N D p^2 C_out + 2 D^2 + 256 D + D^2

The block-causal softmax ablation (`attention: causal_softmax`) has no decay projection and
no state; image s of the sequence attends to the (s + 1) N tokens of images 0..s, so its
attention costs (n + 1) N^2 D per image on average instead of the hybrid's terms.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first (NVIDIA's
# data sheets; the dense TF32 peak of each of these parts is half of its bf16 peak).
BF16_PEAK = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]


def train_flops_per_image(arch: dict, seq_len: int) -> float:
    """Model FLOPs of one image's training step (forward + backward); see the module docstring.
    `arch`: ModelConfig.architecture(); `seq_len`: images per training sequence."""
    D, L, H = arch["hidden_size"], arch["depth"], arch["num_heads"]
    p, C = arch["patch_size"], arch["in_channels"]
    C_out = 2 * C if arch["learn_sigma"] else C
    N = (arch["input_size"] // p) ** 2
    d = D // H
    if arch.get("attention", "hybrid") == "causal_softmax":
        per_block = N * 13 * D * D + (seq_len + 1) * N * N * D + 6 * D * D
    else:
        per_block = N * (13 * D * D + D * H) + 2 * N * N * D + 2 * N * D * d + seq_len * D * d
        per_block += 6 * D * D + D * H
    outer = N * p * p * C * D + N * D * p * p * C_out + 2 * D * D + 256 * D + D * D
    forward_macs = L * per_block + outer
    return 3 * 2 * forward_macs


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one device for training at `precision` ("bf16", "tf32", "fp32"),
    from its name (torch.cuda.get_device_name); None when the part or precision is not in the
    table (then a config gives it: logging.peak_tflops)."""
    bf16 = next((peak for key, peak in BF16_PEAK if key in device_name), None)
    if bf16 is None or precision not in ("bf16", "tf32"):
        return None
    return bf16 if precision == "bf16" else bf16 / 2
