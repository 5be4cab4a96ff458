"""Shared fixtures: a real S3 endpoint (moto's standalone server) on 127.0.0.1, and digits shards.

``moto_s3`` (session): one ``python -m moto.server`` subprocess on a free port, stopped after the
session. Use ``moto_s3.bucket()`` for a fresh bucket and ``moto_s3.storage_options`` for fsspec/s3fs::

    def test_x(moto_s3):
        url = f"s3://{moto_s3.bucket()}/data"
        fs = fsspec.filesystem("s3", **moto_s3.storage_options)

Dummy AWS credentials are set in the environment for the session (moto accepts any).
``moto_server_factory(env)`` starts further servers (e.g. with ``INITIAL_NO_AUTH_ACTION_COUNT=0``,
which makes moto check credentials), all stopped after the session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import pytest

from arflow.distributed.env import free_port

# DeepSpeed JIT-compiles its CPU ops into TORCH_EXTENSIONS_DIR, by default one folder shared by
# every virtual environment of the user, where another environment's build forces a rebuild
# (minutes): the tests (and the launchers they start) keep theirs inside the environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_server(env: dict | None = None, timeout: float = 60.0):
    """Run moto's S3 server on a free loopback port; yields its endpoint URL."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(
                            f"moto_server did not start on {url}:\n{log.read().decode()[-2000:]}"
                        ) from None
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class S3Endpoint:
    url: str
    _names = itertools.count()

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.url}}

    def bucket(self, prefix: str = "test") -> str:
        """Create a fresh bucket (boto3: s3fs.mkdir sends a region constraint moto rejects)."""
        import boto3

        name = f"{prefix}-{next(self._names)}"
        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1").create_bucket(
            Bucket=name
        )
        return name


# Set for the whole session, not by a fixture: the environment is restored after every test
# (restore_environment), and processes started by later tests need the credentials too.
for _key, _value in DUMMY_AWS_ENV.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def aws_env():
    """Dummy AWS credentials (moto accepts any): set at import for the whole session."""
    return DUMMY_AWS_ENV


@pytest.fixture(scope="session")
def moto_s3(aws_env):
    with moto_server() as url:
        yield S3Endpoint(url)


@pytest.fixture(scope="session")
def moto_server_factory(aws_env):
    with contextlib.ExitStack() as stack:
        yield lambda env=None: stack.enter_context(moto_server(env))


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """Digits at 8x8 pixels in shards of at most 64 KB (30 samples): every class spans 5-7 shards."""
    from arflow.data.writing.build import build_shards
    from arflow.data.writing.encoders import PixelEncoder
    from arflow.data.writing.sources import DigitsSource

    out = str(tmp_path_factory.mktemp("digits8"))
    build_shards(DigitsSource(8), PixelEncoder(8), out, shard_size=64_000, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> str:
    """A small random diffusers AutoencoderKL saved with save_pretrained (2x down/upsampling,
    4 latent channels, scaling_factor 0.18215 as the SD-VAE's), loaded through the real code."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def restore_environment():
    """Undo what a test leaves in os.environ: an in-process trainer exports RANK, WORLD_SIZE and
    MASTER_PORT (as a launcher would), and a later test's launcher would inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def single_process_env(monkeypatch):
    """What a launcher exports for one process (RANK, WORLD_SIZE, ... on a free port), for
    in-process calls of the CLIs; undone after the test."""
    from arflow.distributed.env import free_port

    for key, value in dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    ).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def process_group():
    """A one-process gloo group for in-process tests of the trainer and the backends; left
    afterwards the library's way (so DeepSpeed in a later test starts clean)."""
    from arflow.distributed.env import init_distributed, shutdown

    info = init_distributed("cpu")
    yield info
    shutdown()
