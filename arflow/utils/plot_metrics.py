"""Training curves of a run as one PNG, from its `metrics.jsonl` (no service needed).

    from arflow.utils.plot_metrics import plot_metrics
    plot_metrics("runs/digits_cpu")          # -> runs/digits_cpu/metrics.png

One panel per metric the run logged: loss, gradient norm, learning rate, images/s, the share
of time spent waiting for data, MFU (or achieved TFLOP/s per device when no peak was known)
and FID / Inception Score when the run evaluated. Needs matplotlib (the `train` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

COLUMNS = 3
PANEL_INCHES = (5.0, 3.5)  # width, height of one panel (binary fractions: exact pixels)
DPI = 100


@dataclass(frozen=True)
class Panel:
    key: str  # in metrics.jsonl
    title: str
    ylabel: str
    percent: bool = False  # a fraction in [0, 1], shown in %
    # "log" (positive values: a late, slow decrease stays visible), "linear", or "auto": log
    # when the values span a factor of 10 or more (early spikes)
    yscale: str = "linear"


PANELS = [
    Panel("loss", "Training loss", "velocity MSE (log scale)", yscale="log"),
    Panel("grad_norm", "Gradient norm (before clipping)", "global L2 norm", yscale="auto"),
    Panel("lr", "Learning rate", "lr"),
    Panel("images_per_s", "Throughput", "images / s (all ranks)"),
    Panel("data_wait_fraction", "Waiting for data", "% of step time", percent=True),
    Panel("mfu", "Model FLOPs utilisation", "% of peak", percent=True),
    Panel("tflops_per_device", "Achieved model FLOP/s", "TFLOP/s per device"),
    Panel("eval/fid", "FID (EMA model)", "FID", yscale="auto"),
    Panel("eval/inception_score", "Inception Score (EMA model)", "IS"),
]


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a crash is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, finite values only, in step order."""
    points = sorted(
        (r["step"], float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and r[key] == r[key] and abs(r[key]) != float("inf")
    )
    return [s for s, _ in points], [v for _, v in points]


def panels_of(rows: list[dict]) -> list[tuple[Panel, list[int], list[float]]]:
    """The panels with data; MFU replaces the TFLOP/s panel when the run logged it."""
    out = [(p, *series(rows, p.key)) for p in PANELS]
    out = [(p, steps, values) for p, steps, values in out if steps]
    if any(p.key == "mfu" for p, _, _ in out):
        out = [item for item in out if item[0].key != "tflops_per_device"]
    return out


def figure_size(panels: int) -> tuple[int, int]:
    """Pixel (width, height) of the PNG for `panels` panels."""
    rows = -(-panels // COLUMNS)
    return int(COLUMNS * PANEL_INCHES[0] * DPI), int(rows * PANEL_INCHES[1] * DPI)


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of `<run_dir>/metrics.jsonl` to `out` (default `<run_dir>/metrics.png`);
    returns its path. Raises FileNotFoundError / ValueError naming the file when there is
    nothing to plot."""
    try:  # the object API, not pyplot: no display needed, no global backend changed
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, PercentFormatter
    except ImportError as err:
        raise ImportError(
            f"plotting needs matplotlib (pip install 'arflow[train]'): {err}"
        ) from err

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    panels = panels_of(read_metrics(path))
    if not panels:
        raise ValueError(f"{path} holds no training metrics to plot")
    out = Path(out) if out is not None else run_dir / "metrics.png"

    rows = -(-len(panels) // COLUMNS)
    width, height = figure_size(len(panels))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, COLUMNS, squeeze=False)
    last_step = max(max(steps) for _, steps, _ in panels)
    for ax, (panel, steps, values) in zip(axes.flat, panels):
        marker = "o" if len(steps) <= 30 else None  # sparse series (FID) show their points
        ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2)
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.set_xlim(0, last_step * 1.02)
        ax.grid(True, alpha=0.3)
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(0, max(max(values) * 1.1, 0.01))
        elif min(values) > 0 and (
            panel.yscale == "log" or (panel.yscale == "auto" and max(values) >= 10 * min(values))
        ):
            ax.set_yscale("log")
            # Plain numbers (0.5, 1, 2) rather than 5x10^-1; within two decades also the 2, 3
            # and 5 multiples, as a short span may hold no power of ten at all.
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            if max(values) < 100 * min(values):
                ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{run_dir.resolve().name}: {last_step} steps", fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out
