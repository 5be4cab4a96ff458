"""Sample images from an ARFlow weight file into one PNG grid: `arflow sample` as a script.

    python launchers/sample.py --ckpt arflow_xl2.safetensors --classes 207,360,387 \
        --cfg 1.5 --steps 250 --sampler sde --seed 0 --out grid.png --vae sd-vae-ft-ema/
"""

from arflow.cli import script

if __name__ == "__main__":
    raise SystemExit(script("sample"))
