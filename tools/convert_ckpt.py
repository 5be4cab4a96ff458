"""Convert ARFlow weights into one self-describing .safetensors: `arflow convert` as a script.

python tools/convert_ckpt.py runs/xl256/checkpoints/step_000400000 --out xl256.safetensors
python tools/convert_ckpt.py --from-official ARFlow-XL-2.pt --out arflow_xl2.safetensors
"""

from arflow.cli import script

if __name__ == "__main__":
    raise SystemExit(script("convert"))
