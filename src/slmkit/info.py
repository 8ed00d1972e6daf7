"""What a model is: architecture, parameter counts by part, bytes by dtype, context length."""

from __future__ import annotations

from collections import Counter

from .loader import LoadedModel
from .model import Decoder, count_parameters
from .modules import is_matrix

INFO_SCHEMA = 1


def weight_bytes(model: Decoder) -> dict[str, int]:
    """Bytes of parameters and persistent buffers held in memory, by dtype."""
    by_dtype: Counter = Counter()
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if n in model.state_dict()]:
        by_dtype[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return dict(by_dtype)


def zero_fractions(model: Decoder) -> tuple[float, dict[str, float]]:
    """(overall, by layer kind) fraction of exactly-zero weights in the linear layers: float weights equal to
    0, and packed codes that dequantize to 0. A kind is the layer's own name (q_proj, down_proj, lm_head)."""
    from .quant.packed import PackedWeight

    zeros: Counter = Counter()
    total: Counter = Counter()
    for name, module in model.named_modules():
        if is_matrix(module):
            w = module.dequantize() if isinstance(module, PackedWeight) else module.weight
            kind = name.rpartition(".")[2]
            zeros[kind] += int((w == 0).sum())
            total[kind] += w.numel()
    overall = sum(zeros.values()) / max(sum(total.values()), 1)
    return overall, {kind: zeros[kind] / total[kind] for kind in total}


def describe(model: Decoder) -> str:
    cfg = model.cfg
    q, kv = cfg.n_heads, cfg.kv_heads
    attention = "multi-head" if q == kv else "multi-query" if kv == 1 else f"grouped-query ({q // kv} per kv head)"
    parts = [f"{cfg.n_layers} layers", f"width {cfg.dim}", f"{q} heads / {kv} kv ({attention})",
             f"head dim {cfg.head_size}", f"{cfg.mlp} {cfg.ffn_dim}", cfg.norm, f"RoPE theta {cfg.rope_theta:g}"]
    if cfg.share_blocks > 1:
        parts.append(f"{cfg.n_stored_layers} stored blocks, each run {cfg.share_blocks}x")
    if cfg.layer_n_heads or cfg.layer_ffn_dims:
        parts.append("layer-wise scaled widths")
    if cfg.sliding_window:
        parts.append(f"sliding window {cfg.sliding_window}")
    parts.append("tied embeddings" if cfg.tie_embeddings else "separate output matrix")
    return ", ".join(parts)


def model_info(lm: LoadedModel) -> dict:
    cfg = lm.model.cfg
    counts = count_parameters(lm.model)
    by_dtype = weight_bytes(lm.model)
    sparsity, by_layer = zero_fractions(lm.model)
    return {"schema": INFO_SCHEMA, "source": lm.source, "format": lm.kind, "architecture": cfg.family,
            "description": describe(lm.model), "params": counts["total"], "params_embedding": counts["embedding"],
            "params_attention": counts["attention"], "params_mlp": counts["mlp"], "params_norm": counts["norm"],
            "weight_bytes": sum(by_dtype.values()), "weight_bytes_by_dtype": by_dtype, "file_bytes": lm.file_bytes,
            "sparsity": sparsity, "sparsity_by_layer": by_layer,
            "context_length": cfg.max_seq_len, "vocab_size": cfg.vocab_size, "config": cfg.to_dict()}


def format_info(info: dict) -> str:
    mb = 1e6
    p = info["params"]
    lines = [f"model        {info['source']} ({info['format']})",
             f"architecture {info['architecture']}: {info['description']}",
             f"parameters   {p / 1e6:.1f}M = embedding {info['params_embedding'] / 1e6:.1f}M + attention "
             f"{info['params_attention'] / 1e6:.1f}M + mlp {info['params_mlp'] / 1e6:.1f}M + norms "
             f"{info['params_norm'] / 1e3:.1f}K",
             "weights      " + ", ".join(f"{d} {b / mb:.1f} MB" for d, b in info["weight_bytes_by_dtype"].items())
             + f" in memory; {info['file_bytes'] / mb:.1f} MB on disk",
             f"context      {info['context_length']} tokens, vocabulary {info['vocab_size']}"]
    return "\n".join(lines + sparsity_lines(info))


def sparsity_lines(info: dict) -> list[str]:
    """The zero weights, and plainly what they do not buy on CPU."""
    line = f"sparsity     {100 * info['sparsity']:.1f}% of linear-layer weights are exactly zero"
    if not info["sparsity"]:
        return [line]
    kinds = ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in info["sparsity_by_layer"].items())
    return [f"{line} ({kinds})",
            "             on CPU these zeros (unstructured or N:M) save no time and no memory: matrices and kernels",
            "             are dense; only a checkpoint saved with sparse storage (slm prune --sparse-storage) is smaller "
            "on disk"]
