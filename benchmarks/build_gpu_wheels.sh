#!/usr/bin/env bash
# Build the folder of wheels that benchmarks/gpu_suite.sh installs on a GPU machine that has
# PyTorch (CUDA) but cannot reach a package index: the packages of the train / vae / eval extras
# that such an image usually lacks, at the versions this project is tested with.
#
#   benchmarks/build_gpu_wheels.sh [FOLDER]      # default: .wheels (git-ignored)
#
# Pure-Python packages are built (or downloaded) as py3-none-any wheels; pydantic-core, the one
# compiled package, is downloaded for CPython 3.12 on x86-64 manylinux. Every package is taken
# without its dependencies: the list below is the closure of deepspeed, webdataset, diffusers and
# torch-fidelity minus what a PyTorch GPU image already holds (torch, torchvision, numpy, pyyaml,
# msgpack, einops, ninja, psutil, py-cpuinfo, packaging, tqdm, huggingface-hub, safetensors,
# regex, requests, filelock, pillow). gpu_suite.sh skips a wheel whose package is already
# installed there at the same or a newer version, and reports requirements left unmet.
set -euo pipefail

cd "$(dirname "$0")/.."
FOLDER=${1:-.wheels}
PY=${PY:-.venv/bin/python}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}

# name==version, pinned to what the project's own environment runs.
PURE=(
  deepspeed==0.19.8
  hjson==3.1.0
  pydantic==2.14.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  webdataset==1.0.2
  braceexpand==0.1.7
  diffusers==0.42.1
  torch-fidelity==0.4.0
  importlib-metadata==10.2.0 # declared by diffusers (unused on Python >= 3.8)
  lazy-importer==0.1.0      # declared by importlib-metadata
)
BINARY=(pydantic-core==2.50.5)

mkdir -p "$FOLDER"
# deepspeed ships an sdist only; its setup.py imports torch, so it is built against this venv's
# torch (no ops are compiled: DeepSpeed builds what it needs at run time, and we need none).
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$FOLDER" "${PURE[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$TARGET_PYTHON" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$FOLDER" "${BINARY[@]}"

# One version of each package, or the install there would stop.
dupes=$(for wheel in "$FOLDER"/*.whl; do basename "$wheel"; done | cut -d- -f1 |
  tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "more than one wheel of: $dupes (remove the stale ones from $FOLDER)" >&2
  exit 1
fi
du -sh "$FOLDER"
ls -1 "$FOLDER"
