"""FID / Inception Score of a checkpoint over all ranks.

    python launchers/evaluate.py --ckpt ema.safetensors --config configs/xl_256.json \
        --set eval.reference=VIRTUAL_imagenet256_labeled.npz --set eval.vae=sd-vae-ft-ema
    torchrun --nproc_per_node 8 launchers/evaluate.py --ckpt ... --config ... [--save-npz s.npz]
    deepspeed --num_gpus 8 launchers/evaluate.py --ckpt ... --config ...

Rank 0 prints the result as one JSON line (fid, inception_score, num_samples, seconds, ...).
"""

from arflow.eval.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
