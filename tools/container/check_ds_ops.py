"""Fail an image build when a DeepSpeed op that was asked for was not compiled into the install.

DeepSpeed's setup.py skips an op that it finds incompatible without an error, even when its
DS_BUILD_<OP> variable asked for it, and the op is then JIT-compiled at every start on every
node. Usage (in the Dockerfile, after `pip install` with DS_BUILD_<OP>=1 set):

    python check_ds_ops.py FUSED_ADAM SHM_COMM

Each argument is the <OP> of a DS_BUILD_<OP> variable of the accelerator DeepSpeed was built
for; prints the prebuilt ops and exits 1 naming any requested op that is unknown or missing.
"""

import sys

from deepspeed.git_version_info import accelerator_name, installed_ops
from deepspeed.ops.op_builder.all_ops import ALL_OPS


def main(requested: list[str]) -> int:
    by_build_var = {builder.BUILD_VAR: name for name, builder in ALL_OPS.items()}
    prebuilt = sorted(name for name, built in installed_ops.items() if built)
    print(f"DeepSpeed ops prebuilt for accelerator {accelerator_name!r}: {', '.join(prebuilt)}")
    problems = []
    for op in requested:
        name = by_build_var.get(f"DS_BUILD_{op}")
        if name is None:
            known = sorted(v.removeprefix("DS_BUILD_") for v in by_build_var)
            problems.append(f"{op}: not an op of accelerator {accelerator_name!r} ({known})")
        elif not installed_ops.get(name):
            problems.append(f"{op}: requested with DS_BUILD_{op}=1 but {name} was not built")
    for problem in problems:
        print(f"check_ds_ops: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
