"""tools/make_shards.py owns its output: while one writer works on an --out (local directory or
S3 prefix), a second one is refused with a message naming the holder, and the first one's
output is complete and intact.

The first writer is held mid-run deterministically: one of its source images is a named pipe,
so reading it blocks until the test writes the image into the pipe."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from arflow.data.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_shards.py"
CLASSES, PER_CLASS = 3, 6


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def gated_folder(root: Path) -> Path:
    """CLASSES classes of PER_CLASS images; the last image of class c0 is a named pipe (the gate)."""
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(PER_CLASS - (c == 0)):
            (root / f"c{c}" / f"{i}.png").write_bytes(png(10 * c + i))
    gate = root / "c0" / "gate.png"
    os.mkfifo(gate)
    return gate


def make_shards(source: Path, out: str, endpoint: str | None) -> list[str]:
    cmd = [sys.executable, str(TOOL), str(source), "--out", out, "--image-size", "8"]
    return cmd + ["--no-progress"] + (["--endpoint-url", endpoint] if endpoint else [])


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the first writer exited ({process.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_writer_is_refused_naming_the_holder(tmp_path, where, request):
    if where == "s3":
        s3 = request.getfixturevalue("moto_s3")
        out, endpoint = f"s3://{s3.bucket()}/digits", s3.url
        fs = fsspec.filesystem("s3", **s3.storage_options)
    else:
        out, endpoint = str(tmp_path / "out"), None
        fs = fsspec.filesystem("file")
    source = tmp_path / "images"
    gate = gated_folder(source)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        make_shards(source, out, endpoint),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # The first writer holds the lock from before it reads its first image, and cannot get
        # past the gate: it is mid-run for as long as the test wants.
        def holds_lock() -> bool:
            try:
                return json.loads(fs.cat_file(f"{out}/.arflow.lock"))["pid"] == first.pid
            except (FileNotFoundError, ValueError, KeyError):
                return False

        wait_for(holds_lock, first, "it took the output's lock")
        second = subprocess.run(
            make_shards(source, out, endpoint), capture_output=True, text=True, env=env, timeout=120
        )
        assert second.returncode != 0
        message = second.stderr.strip().splitlines()[-1]
        assert "Traceback" not in second.stderr, second.stderr
        assert out in message and "make_shards" in message, message
        assert f"pid {first.pid} on host {socket.gethostname()}" in message, message

        gate.write_bytes(png(0))  # opens the pipe: the first writer reads the image and goes on
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    storage_options = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None
    manifest = load_manifest(out, storage_options)
    assert manifest.counts == [PER_CLASS] * CLASSES
    for shard in manifest.shards:
        data = fs.cat_file(shard.url)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)
    assert not fs.exists(f"{out}/shards/c00000_0000.tar.partial")
