"""How much each prunable unit matters: attention heads, MLP channels, hidden (residual) channels, whole blocks.

Two sources of scores, higher = more important:

* activation (Minitron-style, one calibration pass through `slmkit.calib.layerwise`, nothing changed on the way):
  a query head's score is the RMS norm of its attention output before o_proj, sqrt(E ||y_h||^2); an MLP channel's
  is mean |act(gate) * up| (the input of down_proj); a hidden channel's is mean |x| of the attention and MLP
  norms' outputs, summed over blocks; a block's is 1 - cos(input, output) averaged over tokens (ShortGPT /
  Minitron depth pruning: a block that barely turns the residual stream matters least).
* magnitude (no data): products of the weight norms a unit reads and writes (see `magnitude_importance`).

The scoring math is pure functions of statistics (unit-tested); the passes only gather those statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calib import capture, layerwise
from ..modules import block_groups


@dataclass
class Importance:
    """Scores of every prunable unit of a model (higher = keep), per stored layer where widths are per layer."""

    heads: list[torch.Tensor]  # per layer: [H] query heads
    channels: list[torch.Tensor]  # per layer: [F] MLP intermediate channels
    hidden: torch.Tensor  # [C] residual-stream channels
    layers: torch.Tensor  # [L] stored blocks


# ---- pure scoring math ------------------------------------------------------------------------------
def head_scores(mean_sq: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-head RMS output norm from E[x^2] of o_proj's input columns [H*D]: sqrt(sum_D E[x^2]) -> [H]."""
    return mean_sq.float().view(n_heads, -1).sum(-1).sqrt()  # [H*D] -> [H, D] -> [H]


def block_importance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - cos(x, y) of a block's input and output [..., C] -> [...]; 0 = the block changes nothing."""
    return 1 - F.cosine_similarity(x.float(), y.float(), dim=-1)


def keep_heads(scores: torch.Tensor, n_kv_heads: int, per_group: int) -> torch.Tensor:
    """Indices of the query heads to keep, sorted: the `per_group` best of each GQA group, so every kv head
    keeps the same number of query heads (query head h reads kv head h // group, as attention repeats them)."""
    group = scores.numel() // n_kv_heads
    best = scores.view(n_kv_heads, group).topk(per_group, dim=1).indices  # [K, per_group] within each group
    return (best + torch.arange(n_kv_heads)[:, None] * group).flatten().sort().values  # global head indices


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (so kept units keep their relative layout)."""
    return scores.topk(k).indices.sort().values


class _CosineMeter:
    """A forward hook on a block: the mean of 1 - cos(input, output) over every token it sees."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def __call__(self, module, args, output) -> None:
        d = block_importance(args[0], output)  # [B, T]
        self.total += float(d.sum(dtype=torch.float64))
        self.count += d.numel()

    @property
    def value(self) -> float:
        return self.total / max(self.count, 1)


# ---- the passes -------------------------------------------------------------------------------------
def activation_importance(model: nn.Module, tokens: torch.Tensor) -> Importance:
    """Every score from one layer-wise pass of the calibration tokens [N, T] (the model is not changed)."""
    heads, channels, layers = [], [], []
    hidden = torch.zeros(model.cfg.dim)
    for i, block, run in layerwise(model, tokens, "structured pruning: importance", sequential=False):
        meter = _CosineMeter()
        handle = block.register_forward_hook(meter)
        try:
            with capture(block, block_groups(block), hessian=False) as (qkv_in, o_in, mlp_in, down_in):
                run()
        finally:
            handle.remove()
        heads.append(head_scores(o_in.mean_sq, block.attn.n_heads))
        channels.append(down_in.mean_abs)
        hidden += qkv_in.mean_abs + mlp_in.mean_abs  # the attention and MLP norms' outputs
        layers.append(meter.value)
    return Importance(heads, channels, hidden, torch.tensor(layers))


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.float().norm(dim=1)


def _block_magnitudes(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(head scores [H], MLP channel scores [F], squared weights per hidden channel [C], block score)."""
    attn, mlp = block.attn, block.mlp
    o_cols = _row_norms(attn.o_proj.weight.T.reshape(attn.n_heads, -1))  # [H*D, C] -> [H, D*C] -> [H]
    v_rows = _row_norms(attn.v_proj.weight.reshape(attn.n_kv_heads, -1))  # [K*D, C] -> [K, D*C] -> [K]
    heads = o_cols * v_rows.repeat_interleave(attn.n_heads // attn.n_kv_heads)  # query head h reads kv h // group
    gated = mlp.gate_proj is not None
    channels = _row_norms(mlp.up_proj.weight) * _row_norms(mlp.down_proj.weight.T)
    channels = channels * _row_norms(mlp.gate_proj.weight) if gated else channels
    readers = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.up_proj] + ([mlp.gate_proj] if gated else [])
    writers = [attn.o_proj, mlp.down_proj]
    sq = sum(m.weight.float().pow(2).sum(0) for m in readers)  # [out, C] -> [C]
    sq = sq + sum(m.weight.float().pow(2).sum(1) for m in writers)  # [C, in] -> [C]
    written = sum(float(m.weight.float().norm()) ** 2 for m in writers) ** 0.5
    return heads, channels, sq, written


@torch.no_grad()
def magnitude_importance(model: nn.Module) -> Importance:
    """Scores from the weights alone: a head ||W_v of its kv head|| * ||W_o columns of the head||; an MLP channel
    ||gate row|| * ||up row|| * ||down column||; a hidden channel the norm of every weight touching it in the
    residual stream (embedding columns, q/k/v/gate/up columns, o/down rows, output columns); a block the norm of
    what it can write into the stream, sqrt(||W_o||^2 + ||W_down||^2) (a crude proxy: no data tells what it does)."""
    parts = [_block_magnitudes(block) for block in model.blocks]
    sq = model.embed.weight.float().pow(2).sum(0) + sum(p[2] for p in parts)  # [V, C] -> [C]
    if model.lm_head is not None:
        sq += model.lm_head.weight.float().pow(2).sum(0)
    return Importance([p[0] for p in parts], [p[1] for p in parts], sq.sqrt(), torch.tensor([p[3] for p in parts]))
