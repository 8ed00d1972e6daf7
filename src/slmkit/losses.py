"""Token losses as pure tensor functions.

`linear_cross_entropy` is the output projection and the next-token cross-entropy in one: the [N, V] logits are
made a chunk of rows at a time and never held whole, and their gradient is taken inside the same chunk (the
softmax minus the one-hot label), so training holds neither the logits, nor their log-softmax, nor their
gradient: at SmolLM2's 49k vocabulary that is three 400 MB tensors for 2048 tokens in float32. The FLOPs are
those of the plain projection + cross-entropy (one forward matmul, two backward ones), the result the same sum.
"""

from __future__ import annotations

import torch

IGNORE = -100  # label of a position that does not count (prompt, padding)
CHUNK_ROWS = 256  # rows of logits made at once: 256 x 49152 float32 = 50 MB


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """sum over rows with labels != IGNORE of cross_entropy(hidden @ weight.T, labels): hidden [N, C],
    weight [V, C], labels [N]; differentiable in hidden and weight. Under autocast the matmuls run in the
    autocast dtype (as F.linear would) and the softmax in float32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, dtype, chunk)
    with torch.autocast(device, enabled=False):
        return _chunks(hidden, weight, labels, dtype, chunk, grads=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype, chunk):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = _chunks(hidden, weight, labels, dtype, chunk, grads=True,
                                                     weight_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype),
                grad_weight * grad_loss.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None,
                None, None, None)


def _chunks(hidden, weight, labels, dtype, chunk, grads: bool, weight_grad: bool = True):
    """(summed loss, d loss / d hidden, d loss / d weight) made `chunk` rows at a time (no grads: Nones)."""
    w = weight.to(dtype)  # [V, C]
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads else None  # [N, C]
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads and weight_grad else None
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk].to(dtype), labels[start:start + chunk]  # [n, C], [n]
        logits = (h @ w.T).float()  # [n, V]
        valid = y != IGNORE  # [n]
        target = y.clamp(min=0)
        lse = torch.logsumexp(logits, dim=-1)  # [n]
        picked = logits.gather(1, target[:, None]).squeeze(1)  # [n]
        loss += ((lse - picked) * valid).sum()
        if grads:
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits  [n, V]
            g[torch.arange(len(y), device=y.device), target] -= 1.0
            g = g.mul_(valid[:, None]).to(dtype)
            grad_hidden[start:start + chunk] = (g @ w).to(hidden.dtype)
            if grad_weight is None:
                continue
            if dtype == torch.float32:
                grad_weight.addmm_(g.T, h)  # [V, C] += [V, n] @ [n, C]
            else:
                grad_weight.add_(g.T @ h)  # in the autocast dtype, accumulated in float32
    return loss, grad_hidden, (grad_weight.to(weight.dtype) if grad_weight is not None else None)
