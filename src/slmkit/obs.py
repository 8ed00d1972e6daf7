"""The Optimal Brain Surgeon column sweep that GPTQ (quantization) and SparseGPT (pruning) share.

For a linear layer with weights W [out, n] and inputs X, the layer-wise objective ||W X - W' X||^2 has the
Hessian H = 2 X X^T / N [n, n]. Fixing column j of W to a new value (quantized, or zero) and moving the
remaining columns by the OBS update keeps the objective as small as it can be; with the upper Cholesky factor
U of H^-1 the update for column j is  W[:, j+1:] -= err * U[j, j+1:],  err = (w - w') / U[j, j]  (Frantar &
Alistarh: GPTQ 2022, SparseGPT 2023). Columns are processed in blocks so most of the update is one matmul.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import SlmError


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (never active: H[j, j] = 0) get H[j, j] = 1 and zero weights; then `damp` x mean(diag)
    is added to the diagonal. Returns (W', H') as new tensors."""
    W, H = W.clone().float(), H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    return W, H


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (computed in float64 for stability)."""
    try:
        L = torch.linalg.cholesky(H.double())
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    except torch.linalg.LinAlgError:
        raise SlmError("the calibration Hessian is not positive definite even after damping; raise the "
                       "damping or use more calibration samples") from None


def obs_sweep_(W: torch.Tensor, U: torch.Tensor, fix_column: Callable[[int, torch.Tensor], torch.Tensor],
               on_block: Callable[[int, int, torch.Tensor], None] | None = None, block: int = 128) -> None:
    """Fix the columns of W [out, n] in order, each replaced by fix_column(j, current column [out]) -> [out],
    propagating each column's error to the columns after it. on_block(i1, i2, B) runs before each block with
    B [i2 - i1, out] = the block's current columns as rows (SparseGPT chooses the block's mask there; GPTQ
    reads a group's updated weights there). The work runs on W transposed, so every column is contiguous."""
    Wt = W.T.contiguous()  # [n, out]: column j of W is row j
    n = Wt.shape[0]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        B, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # [b, out] (a view), [b, b]
        err = torch.empty_like(B)  # [b, out]
        if on_block is not None:
            on_block(i1, i2, B)
        for i in range(i2 - i1):
            w = B[i]
            err[i] = (w - fix_column(i1 + i, w)) / U1[i, i]
            B[i + 1:].addr_(U1[i, i + 1:], err[i], alpha=-1)  # later columns absorb this column's error
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err, alpha=-1)  # and so do the columns after the block
