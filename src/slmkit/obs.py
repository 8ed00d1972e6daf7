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
               on_block: Callable[[int, int, torch.Tensor], None] | None = None, block: int = 128) -> torch.Tensor:
    """Fix the columns of W [out, n] in order, each replaced by fix_column(j, current column [out]) -> [out],
    propagating each column's error to the columns after it. on_block(i1, i2, W[:, i1:i2]) runs before each
    block (SparseGPT chooses the block's mask there). Returns the fixed matrix; W is used as scratch."""
    n = W.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # [out, b], [b, b]
        err = torch.zeros_like(W1)  # [out, b]
        if on_block is not None:
            on_block(i1, i2, W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            fixed = fix_column(i1 + i, w)
            err[:, i] = (w - fixed) / U1[i, i]
            W1[:, i:] -= err[:, i:i + 1] * U1[i:i + 1, i:]  # column i becomes `fixed` exactly
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return W
