#!/usr/bin/env bash
# Build the image from the Dockerfile on a local Debian base with a CPU torch wheel, then run it:
# `arflow --help`, the digits as shards, and a few training steps on one process. Needs root,
# buildah and mmdebstrap (Debian: apt-get install buildah mmdebstrap) and the package indexes;
# no container registry and no GPU. Not part of the test suite: it installs a few GB.
#
#   TORCH_WHEEL=/path/to/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
#       tools/container/smoke.sh
#
# Parameters (environment variables):
#   TORCH_WHEEL   a CPU torch wheel for the base's Python (Debian bookworm: cp311); required
#   IMAGE         the image to build                        (default localhost/arflow:smoke)
#   BASE_IMAGE    the Debian base; made with mmdebstrap and committed when missing
#                                                           (default localhost/arflow-base:bookworm)
#   SUITE         Debian release of the base                (default bookworm)
#   STEPS         training steps inside the image           (default 10)
#   OUT           where smoke.json and the logs go          (default runs/container-smoke)
#   PIP_CONF      pip configuration passed as the build secret pip_conf (default: written from
#                 `pip config list` of this machine: its index settings, without local paths)
#   CA_BUNDLE     CA bundle passed as the build secret ca_bundle (default: pip's `cert`,
#                 else SSL_CERT_FILE, else none)
#   NO_CACHE      1: rebuild every layer (for a build time from scratch)
# Both secrets are mounted only into the pip steps of the build; neither lands in the image.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${IMAGE:-localhost/arflow:smoke}
BASE_IMAGE=${BASE_IMAGE:-localhost/arflow-base:bookworm}
SUITE=${SUITE:-bookworm}
STEPS=${STEPS:-10}
OUT=${OUT:-runs/container-smoke}
: "${TORCH_WHEEL:?set TORCH_WHEEL to a CPU torch wheel for the Python of the base image}"

for tool in buildah mmdebstrap python3; do
  command -v "$tool" >/dev/null || {
    echo "smoke: $tool is not installed" >&2
    exit 2
  }
done
[[ -f $TORCH_WHEEL ]] || {
  echo "smoke: TORCH_WHEEL=$TORCH_WHEEL is not a file" >&2
  exit 2
}
# torch-2.13.0+cpu-cp311-... -> torch==2.13.0+cpu: only the given wheel matches.
wheel_name=$(basename "$TORCH_WHEEL")
torch_version=$(cut -d- -f2 <<<"$wheel_name")
[[ $wheel_name == torch-* && -n $torch_version ]] || {
  echo "smoke: $wheel_name is not a torch wheel" >&2
  exit 2
}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d)
container=""
cleanup() {
  if [[ -n $container ]]; then buildah rm "$container" >/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# 1. The base image: a Debian root file system from the package archive of Debian.
if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "smoke: base $BASE_IMAGE is there"
else
  echo "smoke: making the base $BASE_IMAGE with mmdebstrap ($SUITE)"
  mmdebstrap --variant=minbase --include=ca-certificates "$SUITE" "$work/rootfs.tar"
  base=$(buildah from scratch)
  buildah add "$base" "$work/rootfs.tar" / >/dev/null
  buildah config --cmd /bin/bash "$base"
  buildah commit --rm "$base" "$BASE_IMAGE" >/dev/null
  rm "$work/rootfs.tar"
fi

# 2. The secrets: the pip index settings and the CA bundle of this machine.
if [[ -z ${PIP_CONF:-} ]] && command -v pip >/dev/null; then
  PIP_CONF=$work/pip.conf
  pip config list | python3 "$ROOT/tools/container/pip_build_conf.py" >"$PIP_CONF"
  chmod 600 "$PIP_CONF"
fi
if [[ -z ${CA_BUNDLE:-} ]]; then
  CA_BUNDLE=$(pip config get global.cert 2>/dev/null || echo "${PIP_CERT:-${SSL_CERT_FILE:-}}")
fi
secrets=()
if [[ -n ${PIP_CONF:-} ]]; then secrets+=(--secret "id=pip_conf,src=$PIP_CONF"); fi
if [[ -n $CA_BUNDLE ]]; then secrets+=(--secret "id=ca_bundle,src=$CA_BUNDLE"); fi
echo "smoke: pip secrets: pip_conf=${PIP_CONF:-none} ca_bundle=${CA_BUNDLE:-none}"

# 3. The build: CPU torch from the wheel, DeepSpeed for its CPU accelerator with the
# shared-memory communication op prebuilt, the `train` extra.
mkdir "$work/wheels"
ln "$TORCH_WHEEL" "$work/wheels/" 2>/dev/null || cp "$TORCH_WHEEL" "$work/wheels/"
cache=()
if [[ ${NO_CACHE:-0} == 1 ]]; then cache=(--no-cache); fi
echo "smoke: building $IMAGE (log: $OUT/build.log)"
start=$(date +%s)
buildah bud --isolation chroot --layers "${cache[@]}" \
  --build-arg "BUILD_IMAGE=$BASE_IMAGE" --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" \
  --build-arg "TORCH_REQUIREMENT=torch==$torch_version" \
  --build-arg ARFLOW_EXTRAS=train \
  --build-arg DS_ACCELERATOR=cpu --build-arg DS_OPS=SHM_COMM \
  --build-context "wheels=$work/wheels" "${secrets[@]}" \
  -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$OUT/build.log" 2>&1 || {
  tail -n 40 "$OUT/build.log" >&2
  echo "smoke: the build failed (full log: $OUT/build.log)" >&2
  exit 1
}
build_seconds=$(($(date +%s) - start))
# The image's size: its layers as stored (uncompressed), from the manifest.
layer_bytes=$(buildah inspect --type image "$IMAGE" | python3 -c '
import json, sys
print(" ".join(str(layer["size"]) for layer in json.loads(json.load(sys.stdin)["Manifest"])["layers"]))')
image_bytes=$(python3 -c 'import sys; print(sum(map(int, sys.argv[1].split())))' "$layer_bytes")
ds_ops=$(grep -m1 "DeepSpeed ops prebuilt" "$OUT/build.log" || true)
echo "smoke: built in ${build_seconds} s, ${image_bytes} bytes (layers: $layer_bytes); $ds_ops"

# 4. Inside the image, as its (non-root) user in its work directory. An empty extension
# folder that stays empty shows that DeepSpeed loaded its prebuilt op and compiled nothing.
container=$(buildah from --pull-never "$IMAGE")
in_image() {
  buildah run --isolation chroot --env WANDB_MODE=offline \
    --env TORCH_EXTENSIONS_DIR=/tmp/torch_extensions "$container" -- "$@"
}
start=$(date +%s.%N)
in_image arflow --help >"$OUT/help.txt"
help_seconds=$(python3 -c "import time; print(round(time.time() - $start, 2))")
in_image id -un | grep -qx arflow || {
  echo "smoke: the image does not run as its user arflow" >&2
  exit 1
}
in_image arflow make-shards digits --out data/digits --image-size 8 >"$OUT/shards.log" 2>&1
start=$(date +%s)
in_image arflow train --config digits_cpu --set "train.steps=$STEPS" --set logging.every=5 \
  --set checkpoint.every="$STEPS" >"$OUT/train.log" 2>&1 || {
  tail -n 40 "$OUT/train.log" >&2
  echo "smoke: training in the image failed (log: $OUT/train.log)" >&2
  exit 1
}
train_seconds=$(($(date +%s) - start))
jit_files=$(in_image sh -c 'find /tmp/torch_extensions -type f 2>/dev/null | wc -l')
last_row=$(in_image sh -c 'grep "\"loss\"" runs/digits_cpu/metrics.jsonl | tail -n 1')  # the last training row
checkpoints=$(in_image ls runs/digits_cpu/checkpoints)

IMAGE=$IMAGE BASE_IMAGE=$BASE_IMAGE TORCH_VERSION=$torch_version BUILD_SECONDS=$build_seconds \
  IMAGE_BYTES=$image_bytes LAYER_BYTES="$layer_bytes" DS_OPS="$ds_ops" HELP_SECONDS=$help_seconds STEPS=$STEPS \
  TRAIN_SECONDS=$train_seconds LAST_ROW=$last_row CHECKPOINTS=$checkpoints JIT_FILES=$jit_files \
  python3 - "$OUT/smoke.json" <<'EOF'
import json, os, sys
env = os.environ
result = {
    "image": env["IMAGE"],
    "base": env["BASE_IMAGE"],
    "torch": env["TORCH_VERSION"],
    "build_seconds": int(env["BUILD_SECONDS"]),
    "image_bytes": int(env["IMAGE_BYTES"]),
    "layer_bytes": [int(b) for b in env["LAYER_BYTES"].split()],
    "deepspeed_ops": env["DS_OPS"],
    "help_seconds": float(env["HELP_SECONDS"]),
    "train_steps": int(env["STEPS"]),
    "train_seconds": int(env["TRAIN_SECONDS"]),
    "last_training_row": json.loads(env["LAST_ROW"]),
    "checkpoints": env["CHECKPOINTS"].split(),
    "jit_compiled_files": int(env["JIT_FILES"]),
}
with open(sys.argv[1], "w") as f:
    json.dump(result, f, indent=2)
print(json.dumps(result, indent=2))
EOF
if [[ $jit_files != 0 ]]; then
  echo "smoke: DeepSpeed compiled $jit_files files at run time: the prebuilt op was not used" >&2
  exit 1
fi
