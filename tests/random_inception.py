"""Randomly initialised InceptionV3 weights in torch-fidelity's format, for tests and benchmarks
on machines without the real file (which cannot be downloaded there): the features mean
nothing, but the loading code, the network and its cost are the real ones."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3


def write_random_weights(path: str | Path, seed: int = 0) -> Path:
    """Save random InceptionV3 weights to `path`.

    The module as built has zero BatchNorm weights and variances (every feature would be 0), so
    BatchNorm becomes the identity (weight 1, running_var 1) and convolutions get a He-normal
    init, which keeps activations at a usable scale through the whole network.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        # The constructor always loads weights; skip that once to get the bare module.
        with mock.patch.object(
            FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None
        ):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(empty))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 1.0 / math.sqrt(module.in_features), generator=gen)
                module.bias.zero_()
    torch.save(net.state_dict(), path)
    return path
