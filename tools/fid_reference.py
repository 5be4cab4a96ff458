"""Reference statistics of a dataset for FID during training and in launchers/evaluate.py.

    python tools/fid_reference.py data/imagenet_shards --out ref_256.npz --resolution 256
    python tools/fid_reference.py /datasets/imagenet/train --out ref_256.npz --resolution 256

SRC is a pixel shard set (a directory with manifest.json, or an s3:// URL) or an image folder;
--resolution resizes and centre-crops as ADM's reference batches do. Set the output as
`eval.reference` in the run config. Runs under torchrun to split the images over ranks.
"""

from arflow.eval.cli import fid_reference_main

if __name__ == "__main__":
    fid_reference_main()
