"""GPTQ (Frantar et al., 2022): quantize one column at a time and let the remaining columns absorb the error,
weighted by the calibration Hessian (see slmkit.obs for the shared sweep).

Options: group size (from the scheme), activation order (columns with the largest Hessian diagonal first),
damping (fraction of the mean diagonal added before inverting), static groups (every group's scale chosen
from the original weights before the sweep). Our packed formats and GGUF need each group to be contiguous in
the original column order, so activation order always uses static groups (no g_idx permutation is stored).
Scales can be searched (a clip search weighted by the Hessian diagonal) rather than taken from the range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..calib import CalibConfig, capture, layerwise
from ..errors import require
from ..modules import LayerFilter, block_groups, set_module
from ..obs import inverse_cholesky_upper, obs_sweep_, prepare_hessian
from .packed import quantized_linear
from .rtn import Q8_TABLES, check_group_widths, quantize_tables_
from .scheme import (LayerScheme, QScheme, dequantize, dequantize_weight, fp16_round, grouped, qparams, quantize,
                     scheme_for, search_qparams)


@dataclass
class GPTQConfig:
    scheme: QScheme = field(default_factory=QScheme)
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False  # implied by act_order
    block_size: int = 128  # columns per lazy-update block
    sequential: bool = True  # each block calibrated on the quantized blocks' outputs (one more pass per block)
    search: bool = False  # also sweep from clip-searched scales (weighted by the Hessian diagonal); keep the better
    refit: int = 0  # rounds of least-squares refit of the scales for the chosen codes, each followed by a sweep
    keep_zeros: bool = True  # symmetric schemes: weights already exactly zero (pruned) stay exactly zero
    embedding: QScheme | None = Q8_TABLES
    layers: LayerFilter = field(default_factory=LayerFilter)
    overrides: tuple[LayerScheme, ...] = ()  # per-layer schemes (mixed precision); others take `scheme`
    calib: CalibConfig = field(default_factory=CalibConfig)
    method: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    def apply_(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        check_group_widths(model, self)
        require(0 <= self.damp < 1 and self.block_size >= 1, f"gptq: damp must be in [0, 1), got {self.damp}")
        require(self.refit >= 0, f"gptq: refit must be >= 0 rounds, got {self.refit}")
        for i, block, run in layerwise(model, calib, f"gptq {self.scheme.describe()}",
                                         sequential=self.sequential):
            groups = [g for g in block_groups(block) if any(self.layers(f"blocks.{i}.{n}") for n in g.names)]
            with capture(block, groups, hessian=True) as stats:
                run()
            for group, st in zip(groups, stats):
                names = [n for n in group.names if self.layers(f"blocks.{i}.{n}")]
                schemes = {n: scheme_for(f"blocks.{i}.{n}", self.scheme, self.overrides) for n in names}
                for scheme in dict.fromkeys(schemes.values()):  # linears sharing a scheme are swept as one matrix
                    same = [n for n in names if schemes[n] == scheme]
                    gptq_linears_(block, same, st.hessian, dataclasses.replace(self, scheme=scheme))
        quantize_tables_(model, self.embedding, self.search)


def gptq_linears_(root: nn.Module, names: list[str], H: torch.Tensor, cfg: GPTQConfig) -> None:
    """GPTQ the linears `names` (which read the same input, so share H) as one stacked matrix."""
    linears = [root.get_submodule(n) for n in names]
    scheme = cfg.scheme.validate(linears[0].in_features)
    W = torch.cat([m.weight.data.float() for m in linears])  # [sum(out), in]
    codes, scales, offsets = gptq_quantize(W, H, dataclasses.replace(cfg, scheme=scheme),
                                           _pruned_zeros(W, scheme, cfg))
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


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, keep_zero: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """W [out, n], H [n, n] -> codes [out, n] uint8, scales and offsets [out, n / width], by cfg's scheme and
    options. With cfg.search, a sweep from the range's scales and one from the searched scales are both run
    and the one with the lower layer objective kept (the search helps layers with outlier inputs and can hurt
    others). With cfg.refit = k: k rounds of refit_params (the best scales for the codes) and a new sweep
    with those scales fixed, then a last refit; the candidate with the lowest layer objective is returned.

    keep_zero [out, n] bool: entries that must stay exactly zero (sparse-aware GPTQ after pruning; needs a
    symmetric scheme, whose grid holds zero)."""
    scheme = cfg.scheme
    require(keep_zero is None or scheme.symmetric, "sparse-aware GPTQ needs a symmetric scheme (zero on the grid)")
    W, H = prepare_hessian(W, H, cfg.damp)
    starts = [_sweep(W, H, cfg, keep_zero, search=s) for s in ((False, True) if cfg.search else (False,))]
    errors = [layer_objective(W, H, q, scheme) for q in starts]
    best_err = min(errors)
    best = starts[errors.index(best_err)]
    codes = best[0]
    for round_ in range(cfg.refit):
        refit = (codes, *refit_params(W, H, codes, *best[1:], scheme))
        candidates = [refit] + ([_sweep(W, H, cfg, keep_zero, refit[1:])] if round_ < cfg.refit - 1 else [])
        for cand in candidates:
            err = layer_objective(W, H, cand, scheme)
            if err < best_err:
                best, best_err = cand, err
        codes = candidates[-1][0]
    return best


def _sweep(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, keep_zero: torch.Tensor | None,
           given: tuple[torch.Tensor, torch.Tensor | None] | None = None, search: bool = False):
    """One GPTQ sweep of W under the damped H: codes [out, n], scales, offsets; `given` fixes the (scales,
    offsets) instead of choosing them; `search` chooses them by the clip search weighted by H's diagonal."""
    scheme, n = cfg.scheme, W.shape[1]
    width = scheme.width(n)
    static = cfg.act_order or cfg.static_groups or width > cfg.block_size or cfg.block_size % width != 0
    params = _GroupParams(W, scheme, width, torch.diag(H).clone() if search else None, static, given)
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else torch.arange(n)
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

    obs_sweep_(W[:, perm], U, fix, params.watch, cfg.block_size)
    return codes_t.T.contiguous(), params.scales, params.offsets


def layer_objective(W: torch.Tensor, H: torch.Tensor, quantized: tuple, scheme: QScheme) -> float:
    """tr((W - Q) H (W - Q)^T): the output error GPTQ minimises, for quantized = (codes, scales, offsets)."""
    D = W - dequantize_weight(*quantized, scheme)  # [out, n]
    return float(((D @ H) * D).sum())


def refit_params(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor | None, scheme: QScheme, rows: int = 128
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float16 scales (and offsets) that minimise the layer objective for fixed codes: per output row a
    least-squares problem over all its groups jointly, min_p (w - V p)^T H (w - V p), where V holds each
    group's code values (and, asymmetric, its indicator for the offset). A small ridge toward the current
    parameters keeps groups without information (all codes zero) where they are. Row chunks bound memory."""
    out, n = W.shape
    G = scales.shape[1]
    H4 = H.double().reshape(G, n // G, n)  # [G, w, n]
    new_s, new_o = scales.clone(), None if offsets is None else offsets.clone()
    for r in range(0, out, rows):
        V = _basis(codes[r:r + rows], G, scheme)  # [r, G, K, w]
        cur = scales[r:r + rows, :, None] if offsets is None else torch.stack([scales[r:r + rows],
                                                                               offsets[r:r + rows]], -1)
        p = _solve_rows(V, H4, W[r:r + rows].double(), cur.double())  # [r, G, K]
        p = fp16_round(p.float())
        new_s[r:r + rows] = torch.where(p[..., 0] == 0, scales[r:r + rows], p[..., 0])
        if new_o is not None:
            new_o[r:r + rows] = p[..., 1]
    return new_s, new_o


def _basis(codes: torch.Tensor, G: int, scheme: QScheme) -> torch.Tensor:
    """codes [r, n] -> V [r, G, K, w]: the value each parameter multiplies (K = 1: scale; 2: scale, offset)."""
    q = grouped(codes, codes.shape[1] // G).double()  # [r, G, w]
    if scheme.symmetric:
        return (q - scheme.mid)[:, :, None]  # [r, G, 1, w]
    return torch.stack([q, torch.ones_like(q)], 2)  # [r, G, 2, w]


def _solve_rows(V: torch.Tensor, H4: torch.Tensor, W: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """argmin_p (w - V p)^T H (w - V p) + ridge * |p - cur|^2 per row; V [r, G, K, w], H4 [G, w, n], W [r, n]."""
    r, G, K, w = V.shape
    VH = torch.einsum("rgki,gin->rgkn", V, H4)  # [r, G, K, n]: each basis vector times H
    A = torch.einsum("rgkhj,rhlj->rgkhl", VH.reshape(r, G, K, G, w), V).reshape(r, G * K, G * K)
    b = torch.einsum("rgkn,rn->rgk", VH, W).reshape(r, G * K)
    ridge = 1e-6 * A.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp(min=1e-12)  # [r, 1]
    A = A + torch.diag_embed(ridge.expand(r, G * K))
    return torch.linalg.solve(A, b + ridge * cur.reshape(r, G * K)).reshape(r, G, K)


class _GroupParams:
    """Each group's scale (and offset): chosen up front from the original weights (static), or from the
    error-updated weights when the sweep reaches the group's first column (the block being swept is watched)."""

    def __init__(self, W: torch.Tensor, scheme: QScheme, width: int, importance: torch.Tensor | None, static: bool,
                 given: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        """importance [n] (the Hessian diagonal): search each group's clip to minimise the error it weighs;
        None: the range's own scale. given: (scales, offsets) to use as they are."""
        self.scheme, self.width, self.importance, self.static = scheme, width, importance, static or given is not None
        groups = W.shape[1] // width
        self.scales = torch.ones(W.shape[0], groups)
        self.offsets = None if scheme.symmetric else torch.zeros(W.shape[0], groups)
        self.block, self.block_start = None, 0
        if given is not None:
            self.scales, self.offsets = given[0].clone(), None if given[1] is None else given[1].clone()
        elif static:
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
