"""FID between any two image sets: `arflow fid stats|distance` as a script.

python tools/fid.py stats SRC --out stats.npz [--inception-weights PATH]
python tools/fid.py distance A B            # prints {"fid": ...}
"""

from arflow.cli import script

if __name__ == "__main__":
    raise SystemExit(script("fid"))
