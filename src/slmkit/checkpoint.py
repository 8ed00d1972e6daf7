"""Writing models: our own checkpoint (safetensors + JSON), Hugging Face folders and GGUF, always atomically.

Every output is assembled in a temporary sibling and renamed into place only when complete, so an
interrupted job never leaves a half-written artifact under the requested name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import convert
from .config import ModelConfig
from .errors import SlmError, require
from .files import atomic_output

CHECKPOINT_FORMAT = 1
CHECKPOINT_MARKER = "slmkit.json"


def _contiguous_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model, tokenizer, out: Path, force: bool = False, sparse_storage: bool = False) -> Path:
    """Our format: slmkit.json (config, format version, compression steps, packed-module layout, KV-cache
    scheme) + model.safetensors (packed weights stay packed) + tokenizer. sparse_storage: float linear weights
    with enough zeros are stored as bitmask + nonzero values (slmkit.prune.storage; listed under "sparse")."""
    from .quant.packed import packed_layout

    state, sparse = _contiguous_state(model), {}
    if sparse_storage:
        from .prune.storage import compress_state

        state, sparse = compress_state(state, [f"{n}.weight" for n, m in model.named_modules()
                                               if isinstance(m, torch.nn.Linear)])
    with atomic_output(out, force) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
        kv = None if model.kv_scheme is None else dataclasses.asdict(model.kv_scheme)
        meta = {"format": CHECKPOINT_FORMAT, "config": model.cfg.to_dict(), "compression": model.compression,
                "packed": packed_layout(model), "kv_cache": kv, "sparse": sparse}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(meta, indent=2))
    return Path(out)


def export_hf(model, tokenizer, out: Path, force: bool = False) -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer) that transformers loads as-is.

    Shared blocks are unrolled and layer-wise widths padded (exactly) so any model becomes a plain layout."""
    state, cfg = convert.unroll_for_export(_contiguous_state(model), model.cfg)
    hf_state = convert.state_to_hf(state, cfg)
    with atomic_output(out, force) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(convert.config_to_hf(cfg), indent=2))
        tokenizer.save(tmp)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": sorted(tokenizer.stop_ids()) or cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return Path(out)


def export_gguf_float(model, tokenizer, out: Path, dtype: str = "f32", force: bool = False) -> Path:
    """A GGUF file with float weights (f32 or f16), llama architecture, that llama.cpp loads."""
    from .gguf_io import tokenizer_gguf_meta, write_gguf

    state, cfg = convert.unroll_for_export(_contiguous_state(model), model.cfg)
    require(cfg.family == "llama" and not cfg.qk_norm and not cfg.sandwich_norm and cfg.mlp == "swiglu",
            f"GGUF export supports llama-family models; this one is {cfg.family}")
    meta = {**gguf_arch_meta(cfg, file_type=0 if dtype == "f32" else 1), **tokenizer_gguf_meta(tokenizer)}
    with atomic_output(out, force, is_dir=False) as tmp:
        write_gguf(tmp, "llama", meta, convert.state_to_gguf(state, cfg, "llama"), dtype)
    return Path(out)


def gguf_arch_meta(cfg: ModelConfig, file_type: int) -> dict:
    rope = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": cfg.rope_scaling.factor} \
        if cfg.rope_scaling.kind == "linear" else {}
    if cfg.rope_scaling.kind == "llama3":
        raise SlmError("GGUF export of Llama-3 RoPE scaling is not supported yet")
    return {"general.name": "slmkit export", "general.file_type": file_type, "llama.vocab_size": cfg.vocab_size,
            "llama.context_length": cfg.max_seq_len, "llama.embedding_length": cfg.dim,
            "llama.block_count": cfg.n_layers, "llama.feed_forward_length": cfg.ffn_dim,
            "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.kv_heads,
            "llama.attention.key_length": cfg.head_size, "llama.attention.value_length": cfg.head_size,
            "llama.rope.dimension_count": cfg.head_size, "llama.rope.freq_base": cfg.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": cfg.norm_eps, **rope}
