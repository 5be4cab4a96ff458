"""Training curves of a run directory as a PNG (loss, grad norm, lr, images/s, data wait, MFU,
FID when present), from its metrics.jsonl::

    python tools/plot_metrics.py runs/digits_cpu            # -> runs/digits_cpu/metrics.png
    python tools/plot_metrics.py runs/digits_cpu --out curves.png
"""

from arflow.utils.plot_metrics import main

if __name__ == "__main__":
    main()
