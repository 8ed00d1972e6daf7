"""Per-tensor sensitivity, measured once: what quantizing one weight matrix to one format is predicted to cost.

The proxy is the diagonal empirical Fisher (as in HAWQ / Fisher-based mixed precision): for a weight change
delta, the expected per-token KL from the unchanged model is about 1/2 * sum(F * delta^2), where F is the
per-token Fisher diagonal. F is estimated from per-sequence gradients g_s of the mean next-token loss on
calibration text as mean_s(g_s^2): exact when a sequence's tokens have one gradient, T times too small when
their gradients are uncorrelated (on a tiny random model it lands within 2x of the measured KL).
delta is the format's own rounding error (round to nearest with the clip search, the way RTN stores it), so
scores of different tensors and formats add up to a predicted KL of the whole model. The planner calibrates
that sum against the candidates it measures; the sum only has to rank well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import named_linears
from ..progress import progress
from ..quant.scheme import QScheme, dequantize_weight, quantize_weight
from .space import TABLES



def matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices a mixed-precision plan allocates bits to: every block linear, the embedding table
    and an untied lm_head, by qualified module name."""
    out = {name: m.weight for name, m in named_linears(model)}
    if isinstance(model.embed, nn.Embedding):
        out[TABLES[0]] = model.embed.weight
    if isinstance(model.lm_head, nn.Linear):
        out[TABLES[1]] = model.lm_head.weight
    return out


def fisher_diagonal(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token Fisher diagonal of every matrix, from tokens [N, T] (one gradient per sequence)."""
    weights = matrices(model)
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    params = list(weights.values())
    for seq in progress(tokens, "sensitivity (Fisher)"):
        logits = model(seq[None])  # [1, T, V]
        loss = F.cross_entropy(logits[0, :-1].float(), seq[1:])
        grads = torch.autograd.grad(loss, params)
        for (name, _), g in zip(weights.items(), grads):
            fisher[name] += g.float() ** 2
    return {name: f.div_(tokens.shape[0]) for name, f in fisher.items()}


def rounding_error(weight: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """The format's error delta [out, in] on `weight` (what RTN with the clip search would store, minus it)."""
    w = weight.detach().float()
    codes, scales, offsets = quantize_weight(w, scheme)
    return dequantize_weight(codes, scales, offsets, scheme) - w


def scores(weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], schemes: dict[str, QScheme]
           ) -> dict[str, dict[str, float]]:
    """Predicted KL contribution 1/2 * sum(F * delta^2) of every (tensor, format): {tensor: {format: nats}}."""
    out = {}
    for name, w in progress(list(weights.items()), "sensitivity (formats)"):
        out[name] = {fmt: 0.5 * float((fisher[name] * rounding_error(w, s) ** 2).sum()) for fmt, s in schemes.items()
                     if w.shape[1] % s.width(w.shape[1]) == 0}
    return out
