"""ARFlow models: the backbone, its hybrid attention (and the block-causal softmax ablation),
the model zoo, and the weight formats (pretrained.py: one self-describing file; a Hub folder
through `ARFlow.save_pretrained` / `ARFlow.from_pretrained`). The attentions' test references
are in `arflow.models.naive`."""

from arflow.config import MODEL_NAMES, model_kwargs  # the zoo lives with the schema

from .arflow import ARFlow, ARFlowBlock, ARFlowState, create_model
from .causal_attention import CausalSoftmaxAttention, KVCache
from .hybrid_attention import HybridAttention
from .pretrained import (
    architecture_of,
    infer_architecture,
    load_pretrained,
    save_hub_folder,
    save_pretrained,
)

__all__ = [
    "ARFlow",
    "ARFlowBlock",
    "ARFlowState",
    "CausalSoftmaxAttention",
    "KVCache",
    "HybridAttention",
    "MODEL_NAMES",
    "create_model",
    "model_kwargs",
    "architecture_of",
    "infer_architecture",
    "load_pretrained",
    "save_hub_folder",
    "save_pretrained",
]
