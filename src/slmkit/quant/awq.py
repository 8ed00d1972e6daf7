"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales that protect salient weights.

For each group of linears reading one input whose producer can absorb a scale (the norm before q/k/v and
gate/up, up_proj before down_proj, v_proj before o_proj without GQA), search s = mean|x|^a / mean|w|^(1-a)
(normalised) over a grid of a in [0, 1): weights become W * s, the producer's output is divided by s, so the
float model is unchanged while quantizing W * s keeps more of the channels that carry large activations. The
loss of each candidate is the output error of the group's own linears on a subsample of calibration inputs
(AutoAWQ inspects the whole attention / MLP block instead; the linears' own outputs are cheaper and, measured
here, close). Then the weights are quantized by RTN with an importance-weighted clip search (AWQ's clipping
step in the form of slmkit's imatrix search), or, with `quantize=False`, left float for a GPTQ step to follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..calib import CalibConfig, InputStats, capture, layerwise
from ..modules import LayerFilter, LinearGroup, block_groups, set_module
from .packed import quantized_linear
from .rtn import Q8_TABLES, check_group_widths, quantize_tables_
from .scheme import QScheme, dequantize_weight, quantize_weight

LOSS_ROWS = 4096  # calibration rows each group's loss is measured on


@dataclass
class AWQConfig:
    scheme: QScheme = field(default_factory=QScheme)
    grid: int = 20  # candidate exponents a = 0, 1/grid, ..., (grid-1)/grid
    quantize: bool = True  # False: apply the scales only (a GPTQ step quantizes next)
    embedding: QScheme | None = Q8_TABLES
    layers: LayerFilter = field(default_factory=LayerFilter)
    calib: CalibConfig = field(default_factory=CalibConfig)
    method: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True

    def apply_(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        check_group_widths(model, self)
        keep = max(1, calib.numel() // LOSS_ROWS)
        for i, block, run in layerwise(model, calib, f"awq {self.scheme.describe()}"):
            groups = [g for g in block_groups(block) if any(self.layers(f"blocks.{i}.{n}") for n in g.names)]
            with capture(block, groups, hessian=False, keep_every=keep) as stats:
                run()
            # every scale is folded before anything is quantized: up_proj absorbs down_proj's scale
            scales = [awq_scale_(block, g, st, self) if g.producer else None for g, st in zip(groups, stats)]
            for group, st, scale in zip(groups, stats, scales):
                if self.quantize:
                    names = [n for n in group.names if self.layers(f"blocks.{i}.{n}")]
                    _quantize_(block, names, st.mean_sq if scale is None else st.mean_sq / scale ** 2, self.scheme)
        if self.quantize:
            quantize_tables_(model, self.embedding)


def awq_scale_(block: nn.Module, group: LinearGroup, stats: InputStats, cfg: AWQConfig) -> torch.Tensor:
    """Choose the group's scales, fold them into the producer and the consumers; returns s [in]."""
    W = torch.cat([m.weight.data.float() for m in group.consumers])  # [sum(out), in]
    s = search_scale(W, stats.samples, stats.mean_abs, cfg.scheme, cfg.grid)
    fold_scale_(block.get_submodule(group.producer), group.consumers, s)
    return s


def search_scale(W: torch.Tensor, X: torch.Tensor, x_mean: torch.Tensor, scheme: QScheme, grid: int) -> torch.Tensor:
    """The per-input-channel scale s [in] minimising ||X W^T - X (Q(W s) / s)^T||^2 over the exponent grid."""
    w_mean = (W.abs() / W.abs().amax(1, keepdim=True).clamp(min=1e-8)).mean(0)  # [in]
    reference = X @ W.T  # [rows, out]
    best, best_loss = torch.ones_like(x_mean), float("inf")
    for a in [k / grid for k in range(grid)]:
        s = (x_mean.clamp(min=1e-4) ** a / w_mean.clamp(min=1e-4) ** (1 - a)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = ((X @ (_fake(W * s, scheme) / s).T - reference) ** 2).mean().item()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


def _fake(W: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    return dequantize_weight(*quantize_weight(W, scheme, search=False), scheme)


def fold_scale_(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """producer's output / s, consumers' input columns * s: the float function is unchanged."""
    if isinstance(producer, nn.Linear):
        producer.weight.data /= s[:, None]  # output rows
    else:
        producer.weight.data /= s  # a norm's per-channel weight
    if getattr(producer, "bias", None) is not None:
        producer.bias.data /= s
    for m in consumers:
        m.weight.data *= s[None, :]


def _quantize_(block: nn.Module, names: list[str], importance: torch.Tensor, scheme: QScheme) -> None:
    for name in names:
        m = block.get_submodule(name)
        sch = scheme.validate(m.in_features)
        set_module(block, name, quantized_linear(m, *quantize_weight(m.weight.data, sch, importance), sch))
