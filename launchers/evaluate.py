"""FID / Inception Score of a checkpoint over all ranks: `arflow evaluate` as a script.

    python launchers/evaluate.py --ckpt ema.safetensors --config configs/xl_256.json \
        --set eval.reference=VIRTUAL_imagenet256_labeled.npz --set eval.vae=sd-vae-ft-ema
    torchrun --nproc_per_node 8 launchers/evaluate.py --ckpt ... --config ... [--save-npz s.npz]
    deepspeed --num_gpus 8 launchers/evaluate.py --ckpt ... --config ...
"""

from arflow.cli import script

if __name__ == "__main__":
    raise SystemExit(script("evaluate"))
