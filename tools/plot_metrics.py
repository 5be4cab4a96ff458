"""Training curves of a run directory as a PNG: `arflow plot` as a script.

python tools/plot_metrics.py runs/digits_cpu            # -> runs/digits_cpu/metrics.png
"""

from arflow.cli import script

if __name__ == "__main__":
    raise SystemExit(script("plot"))
