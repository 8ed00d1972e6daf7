"""The stated initialisation of a model pretrained from scratch (GPT-2 / nanoGPT style).

Every linear and embedding matrix ~ N(0, std) with std = 0.02; the two projections that write into the
residual stream (attention's o_proj and the MLP's down_proj) ~ N(0, std / sqrt(2 * n_layers)), so the residual
stream's variance does not grow with depth (n_layers counts executed layers, shared blocks included); norm
weights 1, biases 0. Deterministic for a seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INIT_STD = 0.02
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int = 0, std: float = INIT_STD) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    residual_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            s = residual_std if name.rpartition(".")[2] in RESIDUAL_OUTPUTS else std
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * s)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 1:
            module.weight.fill_(1.0)  # RMSNorm / LayerNorm
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


def describe_init(std: float = INIT_STD) -> str:
    return (f"normal(0, {std}) for linear and embedding matrices; o_proj and down_proj normal(0, {std} / "
            "sqrt(2 * n_layers)); norms 1, biases 0")
