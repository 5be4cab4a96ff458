"""Write a class-bucketed WebDataset shard set and its manifest: `arflow make-shards` as a script.

python tools/make_shards.py digits --out data/digits
torchrun --nproc_per_node 8 tools/make_shards.py IMAGENET/train --out s3://... --encode vae --vae SD_VAE_DIR
"""

from arflow.cli import script

if __name__ == "__main__":
    raise SystemExit(script("make-shards"))
