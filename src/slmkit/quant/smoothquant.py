"""SmoothQuant (Xiao et al., 2023): W8A8 with the activation outliers migrated into the weights.

Per input channel j of each group of linears that read one input, s_j = max|X_j|^a / max|W_j|^(1-a); the
producer's output is divided by s and the weights multiplied by it (the float model is unchanged), which
flattens the activation channels so per-token int8 quantization of activations loses little. Weights become
int8 per output channel (symmetric, packed); activations are quantized dynamically per token at run time.
Groups whose producer cannot absorb a scale (o_proj under GQA) are quantized without smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..calib import CalibConfig, capture, layerwise
from ..errors import require
from ..modules import LayerFilter, block_groups, set_module
from .awq import fold_scale_
from .packed import quantized_linear
from .rtn import Q8_TABLES, quantize_tables_
from .scheme import QScheme, quantize_weight

W8_PER_CHANNEL = QScheme(8, 0, True)


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 keeps the activations as they are, 1 moves everything to W
    scheme: QScheme = field(default_factory=lambda: W8_PER_CHANNEL)
    act_bits: int = 8
    embedding: QScheme | None = Q8_TABLES
    layers: LayerFilter = field(default_factory=LayerFilter)
    calib: CalibConfig = field(default_factory=lambda: CalibConfig(samples=32))
    method: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True

    def apply_(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        require(0 <= self.alpha <= 1, f"smoothquant: alpha must be in [0, 1], got {self.alpha}")
        require(2 <= self.act_bits <= 8, f"smoothquant: activation bits must be 2..8, got {self.act_bits}")
        for i, block, run in layerwise(model, calib, f"smoothquant a={self.alpha}"):
            groups = [g for g in block_groups(block) if any(self.layers(f"blocks.{i}.{n}") for n in g.names)]
            with capture(block, groups, hessian=False) as stats:
                run()
            for group, st in zip(groups, stats):
                if group.producer:
                    fold_scale_(block.get_submodule(group.producer), group.consumers,
                                smoothing_scale(group.consumers, st.absmax, self.alpha))
            for group in groups:
                for name in (n for n in group.names if self.layers(f"blocks.{i}.{n}")):
                    self._quantize(block, name)
        quantize_tables_(model, self.embedding)

    def _quantize(self, block: nn.Module, name: str) -> None:
        m = block.get_submodule(name)
        scheme = self.scheme.validate(m.in_features)
        q = quantized_linear(m, *quantize_weight(m.weight.data, scheme, search=False), scheme)
        q.act_bits = self.act_bits
        set_module(block, name, q)


def smoothing_scale(consumers: list[nn.Module], x_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] = max|X|^alpha / max|W|^(1 - alpha), with every consumer's columns counted in max|W|."""
    w_absmax = torch.stack([m.weight.data.abs().amax(0) for m in consumers]).amax(0)  # [in]
    s = x_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5)
