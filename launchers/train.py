"""Train ARFlow: `arflow train` as a script of the checkout, for every launcher.

deepspeed [--num_gpus N] [--num_nodes M --hostfile H] launchers/train.py --config configs/xl_256.json
torchrun --nproc_per_node N launchers/train.py --config configs/xl_256.json
python launchers/train.py --config configs/digits_cpu.json --set train.steps=100
"""

from arflow.cli import script

if __name__ == "__main__":
    raise SystemExit(script("train"))
