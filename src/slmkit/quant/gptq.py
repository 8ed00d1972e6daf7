"""GPTQ (Frantar et al., 2022): quantize one column at a time and let the remaining columns absorb the error,
weighted by the calibration Hessian (see slmkit.obs for the shared sweep).

Options: group size (from the scheme), activation order (columns with the largest Hessian diagonal first),
damping (fraction of the mean diagonal added before inverting), static groups (every group's scale chosen
from the original weights before the sweep). Our packed formats and GGUF need each group to be contiguous in
the original column order, so activation order always uses static groups (no g_idx permutation is stored).
Scales can be searched (a clip search weighted by the Hessian diagonal) rather than taken from the range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..calib import CalibConfig, capture, layerwise
from ..errors import require
from ..modules import LayerFilter, block_groups, set_module
from ..obs import inverse_cholesky_upper, obs_sweep_, prepare_hessian
from .packed import quantized_linear
from .rtn import Q8_TABLES, quantize_tables_
from .scheme import QScheme, dequantize, grouped, qparams, quantize, search_qparams


@dataclass
class GPTQConfig:
    scheme: QScheme = field(default_factory=QScheme)
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False  # implied by act_order
    block_size: int = 128  # columns per lazy-update block
    sequential: bool = True  # each block calibrated on the quantized blocks' outputs (one more pass per block)
    search: bool = False  # clip search for each group's scale, weighted by the Hessian diagonal (imatrix-style)
    keep_zeros: bool = True  # symmetric schemes: weights already exactly zero (pruned) stay exactly zero
    embedding: QScheme | None = Q8_TABLES
    layers: LayerFilter = field(default_factory=LayerFilter)
    calib: CalibConfig = field(default_factory=CalibConfig)
    method: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    def apply_(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        require(0 <= self.damp < 1 and self.block_size >= 1, f"gptq: damp must be in [0, 1), got {self.damp}")
        for i, block, run in layerwise(model, calib, f"gptq {self.scheme.describe()}",
                                         sequential=self.sequential):
            groups = [g for g in block_groups(block) if any(self.layers(f"blocks.{i}.{n}") for n in g.names)]
            with capture(block, groups, hessian=True) as stats:
                run()
            for group, st in zip(groups, stats):
                names = [n for n in group.names if self.layers(f"blocks.{i}.{n}")]
                gptq_linears_(block, names, st.hessian, self)
        quantize_tables_(model, self.embedding, self.search)


def gptq_linears_(root: nn.Module, names: list[str], H: torch.Tensor, cfg: GPTQConfig) -> None:
    """GPTQ the linears `names` (which read the same input, so share H) as one stacked matrix."""
    linears = [root.get_submodule(n) for n in names]
    scheme = cfg.scheme.validate(linears[0].in_features)
    W = torch.cat([m.weight.data.float() for m in linears])  # [sum(out), in]
    codes, scales, offsets = gptq_quantize(W, H, scheme, cfg.damp, cfg.act_order, cfg.static_groups,
                                           cfg.block_size, cfg.search, _pruned_zeros(W, scheme, cfg))
    start = 0
    for name, m in zip(names, linears):
        rows = slice(start, start + m.out_features)
        start += m.out_features
        set_module(root, name, quantized_linear(m, codes[rows], scales[rows],
                                                None if offsets is None else offsets[rows], scheme))


def _pruned_zeros(W: torch.Tensor, scheme: QScheme, cfg: GPTQConfig) -> torch.Tensor | None:
    """W's exact zeros (a prune step's mask), to stay zero: only symmetric grids hold zero exactly."""
    zeros = W == 0
    return zeros if cfg.keep_zeros and scheme.symmetric and bool(zeros.any()) else None


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: QScheme, damp: float = 0.01, act_order: bool = True,
                  static_groups: bool = False, block_size: int = 128, search: bool = False,
                  keep_zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """W [out, n], H [n, n] -> codes [out, n] uint8, scales and offsets [out, n / width].

    keep_zero [out, n] bool: entries that must stay exactly zero (sparse-aware GPTQ after pruning; needs a
    symmetric scheme, whose grid holds zero)."""
    require(keep_zero is None or scheme.symmetric, "sparse-aware GPTQ needs a symmetric scheme (zero on the grid)")
    n, width = W.shape[1], scheme.width(W.shape[1])
    W, H = prepare_hessian(W, H, damp)
    static = act_order or static_groups or width > block_size or block_size % width != 0
    params = _GroupParams(W, scheme, width, torch.diag(H).clone() if search else None, static)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    U = inverse_cholesky_upper(H[perm][:, perm])
    zero_mask = None if keep_zero is None else keep_zero[:, perm].T.contiguous()  # [n, out], swept order

    codes_t = torch.zeros(W.shape[1], W.shape[0], dtype=torch.uint8)  # [n, out]: codes of column j in row j

    def fix(j: int, w: torch.Tensor) -> torch.Tensor:
        col = int(perm[j])
        scale, offset = params.at(col, j)  # [out] each
        q = quantize(w, scale, offset, scheme)  # [out]
        if zero_mask is not None:
            q.masked_fill_(zero_mask[j], scheme.mid)
        codes_t[col] = q
        return dequantize(q, scale, offset, scheme)

    obs_sweep_(W[:, perm], U, fix, params.watch, block_size)
    return codes_t.T.contiguous(), params.scales, params.offsets


class _GroupParams:
    """Each group's scale (and offset): chosen up front from the original weights (static), or from the
    error-updated weights when the sweep reaches the group's first column (the block being swept is watched)."""

    def __init__(self, W: torch.Tensor, scheme: QScheme, width: int, importance: torch.Tensor | None, static: bool):
        """importance [n] (the Hessian diagonal): search each group's clip to minimise the error it weighs;
        None: the range's own scale."""
        self.scheme, self.width, self.importance, self.static = scheme, width, importance, static
        groups = W.shape[1] // width
        self.scales = torch.ones(W.shape[0], groups)
        self.offsets = None if scheme.symmetric else torch.zeros(W.shape[0], groups)
        self.block, self.block_start = None, 0
        if static:
            scale, offset = self._choose(grouped(W, width), 0)  # [out, groups, 1]
            self.scales = scale[..., 0]
            if offset is not None:
                self.offsets = offset[..., 0]

    def _choose(self, g: torch.Tensor, first: int):
        """Parameters of groups g [out, groups, width] whose first column is `first`."""
        if self.importance is None:
            return qparams(g, self.scheme)
        imp = self.importance[first:first + g.shape[1] * g.shape[2]].reshape(1, g.shape[1], g.shape[2])
        return search_qparams(g, self.scheme, imp)

    def watch(self, i1: int, i2: int, W1: torch.Tensor) -> None:
        self.block, self.block_start = W1, i1

    def at(self, col: int, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Parameters [out] for original column `col` (swept as column j)."""
        g = col // self.width
        if not self.static and col % self.width == 0:
            local = j - self.block_start
            scale, offset = self._choose(self.block[local:local + self.width].T[:, None], col)  # [out, 1, 1]
            self.scales[:, g] = scale[:, 0, 0]
            if offset is not None:
                self.offsets[:, g] = offset[:, 0, 0]
        return self.scales[:, g], None if self.offsets is None else self.offsets[:, g]
