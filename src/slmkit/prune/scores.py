"""Unstructured and N:M pruning as pure tensor functions: importance scores, masks, and SparseGPT.

A weight matrix W is [out, n] (rows = output channels, columns = input channels). A mask is a bool tensor of
W's shape, True where the weight is *kept*.

* Magnitude: score |W_ij|.
* Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, the weight times the norm of the input column it reads
  over the calibration tokens, so a small weight on an outlier channel can outrank a large one on a quiet
  channel. Any positive multiple of the norm ranks the same, so sqrt(E[x_j^2]) serves.
* Comparison groups: scores compete within each output row (Wanda's choice: every row keeps the same share),
  or across the whole layer (`per_layer`).
* N:M: in every run of M consecutive input columns of each row keep the N best (2:4, 4:8).
* SparseGPT (Frantar & Alistarh, 2023): an OBS sweep over the columns (slmkit.obs, shared with GPTQ) that
  chooses the mask block by block from w^2 / [U_jj]^2 and moves the kept weights to make up for the pruned
  ones, minimising the layer's output error ||X W^T - X W'^T|| rather than only choosing what to drop.
"""

from __future__ import annotations

import torch

from ..errors import require
from ..obs import inverse_cholesky_upper, obs_sweep_, prepare_hessian

Pattern = tuple[int, int]  # (N, M): keep N of every M consecutive input columns


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W| [out, n]."""
    return W.float().abs()


def wanda_scores(W: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j|| [out, n], from the mean squared input activation per column mean_sq [n]."""
    return W.float().abs() * mean_sq.float().clamp(min=0).sqrt()[None, :]


def check_pattern(pattern: Pattern | None, width: int | None = None) -> None:
    """N:M must keep at least one and fewer than all of each group, and M must divide the layer width."""
    if pattern is None:
        return
    n, m = pattern
    require(1 <= n < m, f"N:M pattern needs 1 <= N < M, got {n}:{m}")
    require(width is None or width % m == 0, f"N:M pattern {n}:{m}: M={m} does not divide the layer width {width}")


def check_sparsity(sparsity: float) -> None:
    require(0 <= sparsity < 1, f"sparsity must be in [0, 1), got {sparsity}")


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_layer: bool = False) -> torch.Tensor:
    """Keep mask dropping the round(sparsity * size) lowest scores of each row (or of the whole layer)."""
    check_sparsity(sparsity)
    size = scores.numel() if per_layer else scores.shape[-1]
    return drop_lowest(scores, round(sparsity * size), per_layer)


def drop_lowest(scores: torch.Tensor, k: int, per_layer: bool = False) -> torch.Tensor:
    """Keep mask without the k lowest scores of each row of scores [rows, cols] (per_layer: of all entries)."""
    flat = scores.reshape(1, -1) if per_layer else scores  # [groups, size]
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, flat.topk(k, dim=1, largest=False).indices, False)
    return keep.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep mask with exactly N kept entries in every M consecutive columns of each row."""
    n, m = pattern
    check_pattern(pattern, scores.shape[-1])
    groups = scores.reshape(-1, m)  # [out * n_cols / M, M]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(scores.shape)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern | None,
                per_layer: bool = False) -> torch.Tensor:
    """The keep mask for an N:M pattern when given, else for unstructured sparsity."""
    return nm_mask(scores, pattern) if pattern is not None else unstructured_mask(scores, sparsity, per_layer)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, pattern: Pattern | None = None,
                    block: int = 128, damp: float = 0.01, per_layer: bool = False) -> torch.Tensor:
    """W [out, n] pruned by SparseGPT with the Hessian H = 2 X^T X / N [n, n] -> W' [out, n] float32 (exact zeros).

    Unstructured: at the start of each block of columns the mask is chosen from w^2 / [U_jj]^2 (the OBS error
    of pruning each weight), dropping the same share of every row's block entries (per_layer: of the whole
    block, as the SparseGPT paper); block shares are rounded cumulatively so every row (or the layer) ends at
    exactly round(sparsity * size) zeros. N:M: each group's mask is chosen when the sweep reaches the group,
    from the weights as the earlier columns' updates left them."""
    check_sparsity(sparsity)
    check_pattern(pattern, W.shape[1])
    W, H = prepare_hessian(W, H, damp)
    U = inverse_cholesky_upper(H)
    if pattern is not None:
        block = max(pattern[1], block - block % pattern[1])  # no N:M group straddles two blocks
    chooser = _MaskChooser(torch.diag(U), sparsity, pattern, per_layer)
    out = torch.zeros(W.shape[1], W.shape[0])  # [n, out]: the pruned column j in row j

    def fix(j: int, w: torch.Tensor) -> torch.Tensor:
        out[j] = w * chooser.keep(j)
        return out[j]

    obs_sweep_(W, U, fix, chooser.watch, block)
    return out.T.contiguous()


class _MaskChooser:
    """SparseGPT's lazy mask: chosen for a block (unstructured) or an N:M group from the weights as the sweep
    reaches it. Scores are w^2 / [U_jj]^2 on the swept rows B [b, out] (column j of W is row j)."""

    def __init__(self, u_diag: torch.Tensor, sparsity: float, pattern: Pattern | None, per_layer: bool):
        self.u_diag, self.sparsity, self.pattern, self.per_layer = u_diag, sparsity, pattern, per_layer
        self.block, self.block_start = None, 0  # the block being swept, [b, out] (a view the sweep updates)
        self.mask, self.mask_start = None, 0  # keep mask [columns, out] from column mask_start on

    def _scores(self, j1: int, j2: int) -> torch.Tensor:
        rows = self.block[j1 - self.block_start:j2 - self.block_start]  # [j2 - j1, out]
        return (rows ** 2 / self.u_diag[j1:j2, None] ** 2).T  # [out, j2 - j1]

    def watch(self, i1: int, i2: int, B: torch.Tensor) -> None:
        self.block, self.block_start = B, i1
        if self.pattern is None:
            scores = self._scores(i1, i2)
            rows = scores.shape[0] if self.per_layer else 1  # entries per column in one comparison group
            k = round(self.sparsity * i2 * rows) - round(self.sparsity * i1 * rows)  # cumulative rounding
            self.mask, self.mask_start = drop_lowest(scores, k, self.per_layer).T, i1

    def keep(self, j: int) -> torch.Tensor:
        """Keep mask [out] of column j."""
        if self.pattern is not None and j % self.pattern[1] == 0:
            self.mask, self.mask_start = nm_mask(self._scores(j, j + self.pattern[1]), self.pattern).T, j
        return self.mask[j - self.mask_start]
