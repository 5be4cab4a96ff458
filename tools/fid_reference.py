"""Reference statistics of a dataset for FID: `arflow fid reference` as a script.

python tools/fid_reference.py data/imagenet_shards --out ref_256.npz --resolution 256
"""

from arflow.cli import script

if __name__ == "__main__":
    raise SystemExit(script("fid", "reference"))
