"""Cutting a model down to the units it keeps: a smaller dense Decoder with a valid config, swapped in in place.

`sliced_config` is the plain config the kept widths make (the same count in every layer, so exports stay
plain layouts); `slice_model_` builds a Decoder from it on the meta device, fills every parameter with the kept
rows and columns of the old one (same dtype and device), and puts its modules in place of the old ones, so the
caller's model object (its compression records, KV-cache scheme and RoPE tables) stays the one in use.

Which rows and columns a unit owns:
  query head h:       q_proj rows h*D..h*D+D, o_proj columns h*D..h*D+D
  kv head k:          k_proj and v_proj rows k*D..k*D+D
  MLP channel c:      gate_proj and up_proj row c, down_proj column c
  hidden channel c:   embedding / output columns, every reading matrix's column c (q, k, v, gate, up), every
                      writing matrix's row c (o, down) and entry c of every residual-width norm
  block i:            the whole block
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..model import Decoder, RMSNorm
from ..modules import set_module
from ..progress import progress


@dataclass
class Keep:
    """The units that survive, as sorted index tensors; per-block entries follow `layers`."""

    hidden: torch.Tensor  # [C'] residual channels
    layers: list[int]  # stored blocks, in model order
    heads: list[torch.Tensor]  # per kept block: query heads [H']
    kv_heads: list[torch.Tensor]  # per kept block: kv heads [K']
    channels: list[torch.Tensor]  # per kept block: MLP channels [F']


def sliced_config(cfg: ModelConfig, dim: int, n_heads: int, ffn_dim: int, layers: list[int]) -> ModelConfig:
    """cfg cut to width `dim`, `n_heads` query heads and `ffn_dim` MLP channels per layer and the stored blocks
    `layers`. GQA keeps its kv heads; multi-head attention loses a kv head with each query head. head_dim is
    written out whenever dim / n_heads no longer gives it; per-layer lists keep the kept blocks' entries."""
    mha = cfg.kv_heads == cfg.n_heads
    n_kv = (None if cfg.n_kv_heads is None else n_heads) if mha else cfg.n_kv_heads
    head_dim = cfg.head_dim if dim % n_heads == 0 and dim // n_heads == cfg.head_size else cfg.head_size

    def pick(values):
        return None if values is None else [values[i] for i in layers]

    return dataclasses.replace(cfg, dim=dim, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=ffn_dim,
                               n_layers=len(layers), sliding_layers=pick(cfg.sliding_layers),
                               layer_n_heads=pick(cfg.layer_n_heads), layer_n_kv_heads=pick(cfg.layer_n_kv_heads),
                               layer_ffn_dims=pick(cfg.layer_ffn_dims)).validate()


def meta_decoder(cfg: ModelConfig) -> Decoder:
    """A Decoder with no weight storage (meta tensors): for shapes and parameter counts."""
    with torch.device("meta"):
        return Decoder(cfg)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head indices [h'] -> the rows (or columns) they own in a [H*D, ...] projection [h'*D]."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # [h', 1] + [D] -> [h', D] -> [h'*D]


def _take_(new: nn.Module, old: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """new.weight (and bias) := old's kept rows and columns: weight [out, in] -> [rows, cols] (a vector [out] ->
    [rows]); bias [out] -> [rows]. Dtype, device and requires_grad stay the old ones'."""
    for name, param in old.named_parameters(recurse=False):
        t = param.data
        if rows is not None:
            t = t.index_select(0, rows.to(t.device))
        if cols is not None and name == "weight":
            t = t.index_select(1, cols.to(t.device))
        setattr(new, name, nn.Parameter(t.contiguous(), requires_grad=param.requires_grad))


def _slice_block(new, old, heads: torch.Tensor, kv_heads: torch.Tensor, channels: torch.Tensor,
                 hidden: torch.Tensor) -> None:
    D = old.attn.head_dim
    q_rows, kv_rows = head_rows(heads, D), head_rows(kv_heads, D)
    _take_(new.attn.q_proj, old.attn.q_proj, q_rows, hidden)
    _take_(new.attn.k_proj, old.attn.k_proj, kv_rows, hidden)
    _take_(new.attn.v_proj, old.attn.v_proj, kv_rows, hidden)
    _take_(new.attn.o_proj, old.attn.o_proj, hidden, q_rows)
    if old.attn.q_norm is not None:  # per-head-dim norms: untouched
        _take_(new.attn.q_norm, old.attn.q_norm)
        _take_(new.attn.k_norm, old.attn.k_norm)
    if old.mlp.gate_proj is not None:
        _take_(new.mlp.gate_proj, old.mlp.gate_proj, channels, hidden)
    _take_(new.mlp.up_proj, old.mlp.up_proj, channels, hidden)
    _take_(new.mlp.down_proj, old.mlp.down_proj, hidden, channels)
    for name, norm in new.named_children():  # the block's own norms all act on the residual width
        if isinstance(norm, (RMSNorm, nn.LayerNorm)):
            _take_(norm, old.get_submodule(name), hidden)


@torch.no_grad()
def slice_model_(model: Decoder, keep: Keep, cfg: ModelConfig) -> Decoder:
    """Replace the model's embeddings, blocks, final norm and output matrix by `cfg`-shaped ones holding the kept
    units; model.cfg becomes cfg. RoPE tables are kept: head size, theta and context do not change."""
    old = model.cfg
    assert (cfg.head_size, cfg.rope_theta, cfg.max_seq_len) == (old.head_size, old.rope_theta, old.max_seq_len)
    small = meta_decoder(cfg)
    _take_(small.embed, model.embed, cols=keep.hidden)  # [V, C] -> [V, C']
    if model.lm_head is not None:
        _take_(small.lm_head, model.lm_head, cols=keep.hidden)
    _take_(small.norm, model.norm, keep.hidden)
    for j, i in progress(list(enumerate(keep.layers)), "structured pruning: slicing"):
        _slice_block(small.blocks[j], model.blocks[i], keep.heads[j], keep.kv_heads[j], keep.channels[j], keep.hidden)
    assert not any(p.is_meta for p in small.parameters()), "a parameter was left unfilled"
    for name, child in small.named_children():
        set_module(model, name, child.train(model.training))
    model.cfg = cfg
    return model
