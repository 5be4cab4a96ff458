"""FID between any two image sets, with the standard InceptionV3 (torch-fidelity's port).

    python tools/fid.py stats SRC --out stats.npz [--inception-weights PATH]
    python tools/fid.py distance A B            # prints {"fid": ...}

SRC (and A, B) is a folder of PNG/JPEG images, an ADM sample `.npz` (arr_0 uint8 NHWC, as
written by launchers/evaluate.py --save-npz) or a pixel shard set; A and B may also be
statistics files (keys mu, sigma: ours or ADM reference batches). Runs under torchrun too.
"""

from arflow.eval.cli import fid_main

if __name__ == "__main__":
    fid_main()
