"""Distribution from outside the model: process group, backends (DDP, FSDP2, DeepSpeed ZeRO),
EMA in the backend's layout, host copies of state (staging) and small collectives. Checkpoints
are arflow.checkpoint's."""

from .backend import Backend, StepResult
from .ema import EMA
from .env import DistInfo, init_distributed, shutdown
from .parallelize import BACKENDS, build_backend

__all__ = [
    "BACKENDS",
    "Backend",
    "DistInfo",
    "EMA",
    "StepResult",
    "build_backend",
    "init_distributed",
    "shutdown",
]
