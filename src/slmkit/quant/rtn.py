"""Round-to-nearest quantization, with an MSE scale search and optional importance weights (imatrix-style).

Plain RTN needs no data. With `imatrix=True` the scale search weighs each input column by the mean squared
activation it meets on calibration data (llama.cpp's importance matrix), gathered layer by layer so each
block is measured on the inputs the already-quantized blocks before it produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..calib import CalibConfig, capture, layerwise
from ..errors import require
from ..modules import LayerFilter, block_groups, named_linears, set_module
from .packed import quantized_embedding, quantized_linear
from .scheme import LayerScheme, QScheme, quantize_weight, scheme_for

Q8_TABLES = QScheme(8, 32, True)  # how llama.cpp stores a tied embedding table in Q4_0 / Q8_0 files


@dataclass
class RTNConfig:
    scheme: QScheme = field(default_factory=QScheme)
    search: bool = True  # search the clip ratio minimising (importance-weighted) squared error; False: plain RTN
    imatrix: bool = False  # weigh the search by calibration activations (needs calibration tokens)
    embedding: QScheme | None = Q8_TABLES  # embedding table and untied output matrix; None keeps them float
    layers: LayerFilter = field(default_factory=LayerFilter)
    overrides: tuple[LayerScheme, ...] = ()  # per-layer schemes (mixed precision); others take `scheme`
    calib: CalibConfig = field(default_factory=CalibConfig)
    method: ClassVar[str] = "rtn"

    @property
    def needs_calibration(self) -> bool:
        return self.imatrix

    def apply_(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        check_group_widths(model, self)
        importance: dict[str, torch.Tensor] = {}
        if self.imatrix:
            for i, block, run in layerwise(model, calib, "rtn (imatrix)"):
                importance.update(block_importance(block, run, f"blocks.{i}."))
                quantize_linears_(model, self, importance, under=f"blocks.{i}.")
        quantize_linears_(model, self, importance)
        quantize_tables_(model, self.embedding, self.search)


def check_group_widths(model: nn.Module, cfg) -> None:
    """Before any calibration: the scheme's group divides the input width of every linear the step quantizes
    (a structurally pruned MLP, say, can be 880 wide); else one line naming the first layer that does not fit."""
    for name, linear in named_linears(model, cfg.layers):
        g = scheme_for(name, cfg.scheme, getattr(cfg, "overrides", ())).group_size
        require(not g or linear.in_features % g == 0,
                f"{cfg.method}: group size {g} does not divide {name}'s {linear.in_features} input columns (prune "
                f"with --mlp-multiple {g}, or quantize with a group size that divides every layer)")


def block_importance(block: nn.Module, run, prefix: str) -> dict[str, torch.Tensor]:
    """Mean squared input activation per column of every linear of the block (qualified names)."""
    groups = block_groups(block)
    with capture(block, groups, hessian=False) as stats:
        run()
    return {prefix + n: s.mean_sq for g, s in zip(groups, stats) for n in g.names}


def quantize_linears_(model: nn.Module, cfg, importance: dict, under: str = "") -> None:
    """RTN every float linear whose name starts with `under` and that cfg.layers accepts."""
    for name, linear in named_linears(model, cfg.layers):
        if name.startswith(under):
            scheme = scheme_for(name, cfg.scheme, getattr(cfg, "overrides", ())).validate(linear.in_features)
            codes, scales, offsets = quantize_weight(linear.weight.data, scheme, importance.get(name), cfg.search)
            set_module(model, name, quantized_linear(linear, codes, scales, offsets, scheme))


def quantize_tables_(model: nn.Module, scheme: QScheme | None, search: bool = True) -> None:
    """Pack the embedding table (and an untied output matrix) with `scheme`; None leaves them as they are."""
    if scheme is None:
        return
    if isinstance(model.embed, nn.Embedding):
        scheme.validate(model.embed.embedding_dim)
        codes, scales, offsets = quantize_weight(model.embed.weight.data, scheme, search=search)
        model.embed = quantized_embedding(model.embed, codes, scales, offsets, scheme)
    if isinstance(model.lm_head, nn.Linear):
        codes, scales, offsets = quantize_weight(model.lm_head.weight.data, scheme, search=search)
        model.lm_head = quantized_linear(model.lm_head, codes, scales, offsets, scheme)
