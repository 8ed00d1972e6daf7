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
from .modules import contiguous_state  # noqa: F401  (re-exported: callers take it from here too)

CHECKPOINT_FORMAT = 1
CHECKPOINT_MARKER = "slmkit.json"


def save_checkpoint(model, tokenizer, out: Path, force: bool = False, sparse_storage: bool = False) -> Path:
    """Our format: slmkit.json (config, format version, compression steps, packed-module layout, KV-cache
    scheme) + model.safetensors (packed weights stay packed) + tokenizer. sparse_storage: float linear weights
    with enough zeros are stored as bitmask + nonzero values (slmkit.prune.storage; listed under "sparse")."""
    from .quant.packed import packed_layout

    state, sparse = contiguous_state(model), {}
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

    Shared blocks are unrolled and layer-wise widths padded (exactly) so any model becomes a plain layout.
    Packed weights are refused here: slmkit.export.export_model writes them in the compressed-tensors format."""
    refuse_packed(model)
    hf_state, cfg = float_hf_state(model)
    return write_hf_folder(out, hf_state, convert.config_to_hf(cfg), tokenizer, cfg, force)


def refuse_packed(model) -> None:
    """SlmError if the model holds packed weights, which a float Hugging Face folder cannot hold."""
    from .quant.packed import PackedWeight

    packed = [n for n, m in model.named_modules() if isinstance(m, PackedWeight)]
    require(not packed, f"{packed[0] if packed else ''} holds packed weights, which a float Hugging Face folder "
            "cannot hold; use slm export --format hf --type auto (compressed-tensors pack-quantized)")


def float_hf_state(model) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The model's float state under transformers' names, unrolled and padded to a plain layout, and the
    config of that layout."""
    state, cfg = convert.unroll_for_export(contiguous_state(model), model.cfg)
    return convert.state_to_hf(state, cfg), cfg


def block_linear_keys(model, cfg: ModelConfig) -> list[str]:
    """transformers' names of the blocks' float Linear weights in the exported (unrolled) layout `cfg`."""
    linears = {n.split(".", 2)[2] for n, m in model.named_modules()
               if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)}
    ours = {f"blocks.{i}.{n}.weight": torch.empty(0) for i in range(cfg.n_layers) for n in linears}
    return sorted(convert.state_to_hf(ours, cfg))


def write_hf_folder(out: Path, hf_state: dict, hf_config: dict, tokenizer, cfg: ModelConfig, force: bool) -> Path:
    """A Hugging Face folder, atomically: model.safetensors, config.json, the tokenizer, generation_config.json."""
    with atomic_output(out, force) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        tokenizer.save(tmp)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": sorted(tokenizer.stop_ids()) or cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return Path(out)


def export_gguf(model, tokenizer, out: Path, file_type: str = "auto", force: bool = False) -> Path:
    """A GGUF file (llama architecture) that llama.cpp loads: F32, F16, or a quantized file type
    (slmkit.quant.ggml.FILE_TYPES). Packed weights whose scheme is a GGML block grid are written code for
    code; float matrices are quantized to the type llama.cpp would give them. `auto`: the block matrices'
    own packed type, F32 for a float model. A request that the packed block weights cannot meet exactly is
    refused with the type that fits."""
    from .gguf_io import tokenizer_gguf_meta, write_gguf
    from .quant import ggml

    state, packed = _gguf_sources(model)
    ftype = ggml.file_type(_auto_file_type(packed) if file_type == "auto" else file_type)
    state, cfg = convert.unroll_for_export(state, model.cfg)
    require(cfg.family == "llama" and not cfg.qk_norm and not cfg.sandwich_norm and cfg.mlp == "swiglu",
            f"GGUF export supports llama-family models; this one is {cfg.family}")
    names = dict(convert.gguf_pairs(cfg.n_layers))
    packed = {names[_unrolled(k, layer)]: t for k, t in packed.items()
              for layer in _layers_of(k, model.cfg)}
    tensors = {}
    for name, t in convert.state_to_gguf(state, cfg, "llama").items():
        have = packed.get(name)
        shape = tuple(t.shape) if have is None else (t.shape[0], t.shape[1] // have.nbytes * have.block)  # blocks
        planned = ggml.file_plan(name, shape, ftype, cfg.n_layers, cfg.tie_embeddings)
        if have is not None:
            _check_request(name, have, planned, file_type)
        tensors[name] = (t, have) if have is not None else (ggml.encode_float(t, planned), planned)
    meta = {**gguf_arch_meta(cfg, file_type=ftype.id), **tokenizer_gguf_meta(tokenizer)}
    if ftype.main not in ("F32", "F16"):
        meta["general.quantization_version"] = 2  # ggml's block layouts, as llama.cpp's quantizer records them
    with atomic_output(out, force, is_dir=False) as tmp:
        write_gguf(tmp, "llama", meta, tensors)
    return Path(out)


def _gguf_sources(model) -> tuple[dict[str, torch.Tensor], dict]:
    """The float state with every packed weight replaced by its GGML blocks [out, bytes per row] under
    `NAME.weight`, and {NAME.weight: GGMLType} of those. Refuses schemes no GGML type stores exactly."""
    from .quant import ggml
    from .quant.packed import state_with_packed_as

    packed = {}

    def blocks(name, module):
        packed[f"{name}.weight"] = gtype = ggml.check_exact(name, module.scheme)
        return {"weight": ggml.encode_codes(module.codes(), module.scales, module.offsets, gtype)}

    state = state_with_packed_as(model, blocks)
    cfg = model.cfg
    require(not packed or not (cfg.layer_n_heads or cfg.layer_n_kv_heads or cfg.layer_ffn_dims),
            "GGUF export of packed weights needs uniform layer widths; export the float model")
    return state, packed


def _layers_of(key: str, cfg: ModelConfig) -> list[int | None]:
    """The unrolled layers a stored key appears in (shared blocks repeat); [None] for non-block keys."""
    if not key.startswith("blocks."):
        return [None]
    stored = int(key.split(".")[1])
    return [layer for layer in range(cfg.n_layers) if layer // cfg.share_blocks == stored]


def _unrolled(key: str, layer: int | None) -> str:
    return key if layer is None else f"blocks.{layer}.{key.split('.', 2)[2]}"


def _auto_file_type(packed: dict) -> str:
    """The most common packed type among the block matrices (F32 when nothing is packed)."""
    kinds = [t.name for k, t in packed.items() if k.startswith("blocks.")] or ["F32"]
    return max(set(kinds), key=kinds.count)


def _check_request(name: str, have, planned, requested: str) -> None:
    """A packed block matrix must already be the type the requested file gives it; the embedding/output
    table keeps whatever exact type it was packed in."""
    if requested == "auto" or not name.startswith("blk.") or have.name == planned.name:
        return
    raise SlmError(f"{name} is packed as {have.scheme.describe()}, which GGUF stores as {have.name}, but "
                   f"{requested} needs {planned.name} there; export with --type {have.name} (nothing is "
                   "re-quantized), or quantize the float model to that type")


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
