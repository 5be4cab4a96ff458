"""The container build's helpers and context (the image itself is built and run by
tools/container/smoke.sh, outside the suite: it installs a few GB)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools/container"


def test_pip_build_conf_keeps_index_settings_and_drops_local_paths():
    """`pip config list` of a machine with a local wheel folder, a constraint file, a CA path
    and file: indexes beside a real one: only what reaches an index from a build remains, and
    a later scope (the environment) overrides an earlier one."""
    listing = "\n".join(
        [
            "global.cert='/etc/ssl/certs/ca-certificates.crt'",
            "global.constraint='/etc/pip/constraints.txt'",
            "global.index-url='https://pypi.example.org/simple'",
            "user.find-links='/opt/wheels'",
            "user.extra-index-url='file:///opt/mirror/simple https://extra.example.org/simple'",
            "global.timeout='60'",
            ":env:.timeout='180'",
            ":env:.trusted-host='pypi.example.org'",
        ]
    )
    out = subprocess.run(
        [sys.executable, str(TOOLS / "pip_build_conf.py")],
        input=listing,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == [
        "[global]",
        "index-url = https://pypi.example.org/simple",
        "extra-index-url = https://extra.example.org/simple",
        "timeout = 180",
        "trusted-host = pypi.example.org",
    ]


def check_ds_ops(*ops: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / "check_ds_ops.py"), *ops], capture_output=True, text=True
    )


def test_check_ds_ops_fails_on_an_op_that_was_not_prebuilt():
    """The suite's DeepSpeed is installed without prebuilt ops (JIT): a build that asked for
    one must fail, naming it; so must an op name its accelerator does not have."""
    missing = check_ds_ops("SHM_COMM")
    assert missing.returncode == 1
    assert "SHM_COMM: requested with DS_BUILD_SHM_COMM=1" in missing.stderr
    unknown = check_ds_ops("NO_SUCH_OP")
    assert unknown.returncode == 1 and "NO_SUCH_OP: not an op of accelerator" in unknown.stderr


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    """The context is an allow-list: every path a COPY reads from it must be let in."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = [src for line in copies for src in line.split()]
    assert sources, "no COPY from the context found in the Dockerfile"
    for src in sources:
        assert src in allowed, f"{src} is copied but .dockerignore keeps it out of the context"
        assert (ROOT / src).exists(), src
