"""How long `arflow --help` and every subcommand's `--help` take, each in a fresh interpreter.

    python benchmarks/cli_help.py [--repeats 5]

Prints JSON: per command line, the median and the worst wall seconds of `python -m arflow ...
--help` (interpreter start included). The target is under 2 s each: the subcommand modules
import nothing heavy (torch, the model, the data stack) until they run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from arflow.cli import COMMANDS


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "arflow", *argv, "--help"], check=True, capture_output=True
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lines = [
        [],
        *([c] for c in COMMANDS),
        *(["fid", w] for w in ("reference", "stats", "distance")),
    ]
    result = {}
    for argv in lines:
        times = [seconds(argv) for _ in range(args.repeats)]
        result[" ".join(["arflow", *argv, "--help"])] = {
            "median_s": round(statistics.median(times), 3),
            "max_s": round(max(times), 3),
        }
    print(json.dumps({"repeats": args.repeats, "help": result}, indent=2))


if __name__ == "__main__":
    main()
