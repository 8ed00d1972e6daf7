"""Token losses as pure tensor functions.

`linear_cross_entropy` is the output projection and the next-token cross-entropy in one: the [N, V] logits are
made 512 rows at a time and never held whole, and their gradient is taken inside the same chunk (the
softmax minus the one-hot label), so training holds neither the logits, nor their log-softmax, nor their
gradient: at SmolLM2's 49k vocabulary that is three 400 MB tensors for 2048 tokens in float32. The FLOPs are
those of the plain projection + cross-entropy (one forward matmul, two backward ones), the result the same sum.
"""

from __future__ import annotations

import torch

IGNORE = -100  # label of a position that does not count (prompt, padding)
CHUNK_ROWS = 512  # rows of logits made at once: 512 x 49152 float32 = 100 MB


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
    """(summed loss, d loss / d hidden, d loss / d weight) made `chunk` rows at a time (no grads: Nones).

    Every chunk reuses the same logits buffer: a fresh 100 MB tensor per chunk would be a fresh mmap, and
    its page faults cost as much as the softmax."""
    (N, C), V, device = hidden.shape, weight.shape[0], hidden.device
    w = weight.to(dtype)  # [V, C]
    buf = torch.empty(min(chunk, N), V, dtype=torch.float32, device=device)  # the chunk's logits, then gradient
    low = None if dtype == torch.float32 else torch.empty(buf.shape, dtype=dtype, device=device)
    loss = torch.zeros((), dtype=torch.float32, device=device)
    grad_hidden = torch.empty_like(hidden) if grads else None  # [N, C]
    grad_weight = torch.zeros(V, C, dtype=torch.float32, device=device) if grads and weight_grad else None
    for start in range(0, N, chunk):
        h, y = hidden[start:start + chunk].to(dtype), labels[start:start + chunk]  # [n, C], [n]
        n, valid, target = len(y), y != IGNORE, y.clamp(min=0)
        z = _matmul(h, w.T, buf[:n], None if low is None else low[:n])  # float32 logits [n, V]
        torch.log_softmax(z, dim=-1, out=z)
        loss -= (z.gather(1, target[:, None]).squeeze(1) * valid).sum()
        if grads:
            g = _softmax_minus_one_hot_(z, target, valid)
            g = g if low is None else low[:n].copy_(g)  # in the matmul dtype
            grad_hidden[start:start + chunk] = g @ w  # [n, C]
            if grad_weight is not None:
                _add_outer_(grad_weight, g, h)
    return loss, grad_hidden, (grad_weight.to(weight.dtype) if grad_weight is not None else None)


def _softmax_minus_one_hot_(log_probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """d(-log p[target]) / d logits = softmax - one_hot(target), in place of log_probs [n, V]; masked rows 0."""
    g = log_probs.exp_()
    g[torch.arange(len(target), device=target.device), target] -= 1.0
    if not bool(valid.all()):
        g[~valid] = 0.0
    return g


def _add_outer_(grad_weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight [V, C] (float32) += g.T [V, n] @ h [n, C]; a narrower g and h multiply in their dtype."""
    if g.dtype == torch.float32:
        grad_weight.addmm_(g.T, h)
    else:
        grad_weight.add_(g.T @ h)
def _matmul(h: torch.Tensor, wt: torch.Tensor, out: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
    """h @ wt into the float32 `out`, through `low` when the matmul runs in a narrower dtype."""
    if low is None:
        return torch.mm(h, wt, out=out)
    return out.copy_(torch.mm(h, wt, out=low))


def chunked_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, row_loss, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """sum over chunks of row_loss(logits [n, V] float32, start, end) with logits = hidden[start:end] @ weight.T:
    any loss of the output projection's logits (distillation's divergences) without holding the [N, V] logits.

    hidden [N, C], weight [V, C]. Each chunk's logits are made, their loss and its gradient taken at once
    (autograd inside the chunk), and dropped; the backward only scales the stored gradients. row_loss must be
    a function of its logits (and of tensors that need no gradient). Under autocast the matmul runs in the
    autocast dtype, the loss in float32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearLoss.apply(hidden, weight, row_loss, dtype, chunk)
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype)
        return sum((row_loss(torch.mm(hidden[a:a + chunk].to(dtype), w.T).float(), a, min(a + chunk, len(hidden)))
                    for a in range(0, len(hidden), chunk)), torch.zeros((), device=hidden.device))


class _ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, row_loss, dtype, chunk):
        need_w = ctx.needs_input_grad[1]
        w = weight.detach().to(dtype).requires_grad_(need_w)  # [V, C]
        grad_hidden = torch.empty_like(hidden)  # [N, C]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, len(hidden), chunk):
                h = hidden[a:a + chunk].detach().to(dtype).requires_grad_()  # [n, C]
                loss = row_loss(torch.mm(h, w.T).float(), a, a + len(h))  # logits [n, V]
                grads = torch.autograd.grad(loss, [h, w] if need_w else [h])
                grad_hidden[a:a + len(h)] = grads[0]
                if need_w:
                    grad_weight += grads[1]
                total += loss.detach()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype),
                (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None, None, None, None)
