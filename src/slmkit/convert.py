"""Every mapping between slmkit's model and other formats, as explicit tables.

Hugging Face folders (Llama / SmolLM, Qwen2, Mistral, Gemma-3), GGUF files (llama, qwen2 architectures) and
PEFT adapter files (LoRA, prompt tuning): the config fields, the tensor names, and the few value transforms
(Gemma's norm offset, llama.cpp's Q/K row permutation, layer unrolling for export). Nothing else in slmkit knows another format's names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import ModelConfig, RopeScaling, head_dim_scale
from .errors import SlmError, require

# Per-layer tensors, as (slmkit suffix, Hugging Face suffix); "{i}" is the layer index.
_ATTN = (("attn.q_proj.weight", "self_attn.q_proj.weight"), ("attn.k_proj.weight", "self_attn.k_proj.weight"),
         ("attn.v_proj.weight", "self_attn.v_proj.weight"), ("attn.o_proj.weight", "self_attn.o_proj.weight"),
         ("attn.q_proj.bias", "self_attn.q_proj.bias"), ("attn.k_proj.bias", "self_attn.k_proj.bias"),
         ("attn.v_proj.bias", "self_attn.v_proj.bias"),
         ("attn.q_norm.weight", "self_attn.q_norm.weight"), ("attn.k_norm.weight", "self_attn.k_norm.weight"))
_MLP = (("mlp.gate_proj.weight", "mlp.gate_proj.weight"), ("mlp.up_proj.weight", "mlp.up_proj.weight"),
        ("mlp.down_proj.weight", "mlp.down_proj.weight"))
_LLAMA_NORMS = (("attn_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight"))
_GEMMA_NORMS = (("attn_norm.weight", "input_layernorm.weight"), ("post_attn_norm.weight", "post_attention_layernorm.weight"),
                ("mlp_norm.weight", "pre_feedforward_layernorm.weight"),
                ("post_mlp_norm.weight", "post_feedforward_layernorm.weight"))
_GLOBAL = (("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
           ("lm_head.weight", "lm_head.weight"))


@dataclass(frozen=True)
class HFFamily:
    """One Hugging Face architecture family: its names, tensor table and how its config maps to ours."""

    name: str
    model_type: str
    architecture: str
    layer_table: tuple[tuple[str, str], ...]
    norm_offset: float = 0.0  # HF stores (weight - offset): Gemma's RMSNorm multiplies by (1 + weight)
    read_extra: Callable[[dict], dict] = field(default=lambda hf: {})
    write_extra: Callable[[ModelConfig], dict] = field(default=lambda cfg: {})


def _rope_theta(hf: dict, layer_type: str = "full_attention") -> float:
    params = hf.get("rope_parameters") or {}
    params = params.get(layer_type, params) if isinstance(params.get(layer_type), dict) else params
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling(hf: dict) -> RopeScaling:
    params = dict(hf.get("rope_scaling") or {})
    full = hf.get("rope_parameters") or {}
    params = params or (full.get("full_attention", full) if isinstance(full.get("full_attention"), dict) else full)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                           float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    raise SlmError(f"unsupported RoPE scaling {kind!r} (supported: linear, llama3)")


def _llama_extra(hf: dict) -> dict:
    require(not hf.get("mlp_bias"), "unsupported: mlp_bias=true")
    act = {"silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_tanh"}.get(hf.get("hidden_act", "silu"))
    require(act is not None, f"unsupported hidden_act {hf.get('hidden_act')!r}")
    return {"qkv_bias": bool(hf.get("attention_bias", False)), "activation": act}


def _qwen2_extra(hf: dict) -> dict:
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    # Older configs have no layer_types: layers from max_window_layers on slide (transformers' rule).
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                                      for i in range(hf["num_hidden_layers"])]
    sliding = [t == "sliding_attention" for t in types] if window else None
    return {"qkv_bias": True, "sliding_window": window, "sliding_layers": sliding}


def _mistral_extra(hf: dict) -> dict:
    return {"sliding_window": hf.get("sliding_window")}


def _gemma3_extra(hf: dict) -> dict:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention" for i in range(n)]
    local_theta = hf.get("rope_local_base_freq") or _rope_theta(hf, "sliding_attention")
    require(not hf.get("final_logit_softcapping") and not hf.get("attn_logit_softcapping"),
            "unsupported: Gemma logit soft-capping")
    return {"mlp": "geglu", "activation": "gelu_tanh", "qk_norm": True, "sandwich_norm": True,
            "embed_scale": math.sqrt(hf["hidden_size"]), "attn_scale": hf["query_pre_attn_scalar"] ** -0.5,
            "sliding_window": hf.get("sliding_window"), "sliding_layers": [t == "sliding_attention" for t in types],
            "rope_local_theta": float(local_theta)}


def _layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.n_layers)]


def _gemma3_write(cfg: ModelConfig) -> dict:
    scalar = head_dim_scale(cfg) ** -2  # transformers' Gemma3TextConfig takes an integer
    require(abs(scalar - round(scalar)) < 1e-3, f"Gemma-3 export needs 1/attn_scale**2 integral, got {scalar}")
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": round(scalar),
            "sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg),
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": cfg.rope_local_theta or cfg.rope_theta}},
            "final_logit_softcapping": None, "attn_logit_softcapping": None}


def _llama_write(cfg: ModelConfig) -> dict:
    act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation)
    return {"attention_bias": cfg.qkv_bias, "mlp_bias": False, "hidden_act": act, **_rope_write(cfg)}


def _rope_write(cfg: ModelConfig) -> dict:
    s = cfg.rope_scaling
    params: dict[str, Any] = {"rope_type": "default" if s.kind == "none" else s.kind, "rope_theta": cfg.rope_theta}
    if s.kind != "none":
        params["factor"] = s.factor
    if s.kind == "llama3":
        params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                      original_max_position_embeddings=s.original_max_position)
    return {"rope_parameters": params}


FAMILIES = {f.model_type: f for f in (
    HFFamily("llama", "llama", "LlamaForCausalLM", _ATTN + _MLP + _LLAMA_NORMS, read_extra=_llama_extra,
             write_extra=_llama_write),
    HFFamily("qwen2", "qwen2", "Qwen2ForCausalLM", _ATTN + _MLP + _LLAMA_NORMS, read_extra=_qwen2_extra,
             write_extra=lambda cfg: {**_rope_write(cfg), "use_sliding_window": cfg.sliding_window is not None,
                                      "sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg)}),
    HFFamily("mistral", "mistral", "MistralForCausalLM", _ATTN + _MLP + _LLAMA_NORMS, read_extra=_mistral_extra,
             write_extra=lambda cfg: {**_rope_write(cfg), "sliding_window": cfg.sliding_window}),
    HFFamily("gemma3", "gemma3_text", "Gemma3ForCausalLM", _ATTN + _MLP + _GEMMA_NORMS, norm_offset=1.0,
             read_extra=_gemma3_extra, write_extra=_gemma3_write),
)}
FAMILY_BY_NAME = {f.name: f for f in FAMILIES.values()}


def hf_family(hf_config: dict) -> HFFamily:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise SlmError(f"unknown architecture: model_type {model_type!r} (architectures "
                       f"{hf_config.get('architectures')}); supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict) -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> ModelConfig, validated."""
    family = hf_family(hf)
    try:
        fields = dict(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"), ffn_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=_rope_theta(hf), rope_scaling=_rope_scaling(hf),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
            family=family.name)
    except KeyError as exc:
        raise SlmError(f"config.json lacks {exc.args[0]!r} for a {family.model_type} model") from None
    return ModelConfig(**{**fields, **family.read_extra(hf)}).validate()


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> Hugging Face config.json dict for cfg.family (uniform layers only: see unroll_for_export)."""
    family = FAMILY_BY_NAME[cfg.family]
    return {"architectures": [family.architecture], "model_type": family.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
            "intermediate_size": cfg.ffn_dim, "rms_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "dtype": "float32",
            **family.write_extra(cfg)}


def _layer_pairs(family: HFFamily, n_layers: int):
    for ours, theirs in _GLOBAL:
        yield ours, theirs
    for i in range(n_layers):
        for ours, theirs in family.layer_table:
            yield f"blocks.{i}.{ours}", f"model.layers.{i}.{theirs}"


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def state_from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> slmkit names (Gemma norms get their +1 back)."""
    family = FAMILY_BY_NAME[cfg.family]
    out = {}
    for ours, theirs in _layer_pairs(family, cfg.n_layers):
        if theirs in tensors:
            t = tensors[theirs]
            out[ours] = t + family.norm_offset if _is_norm(ours) and family.norm_offset else t
    return out


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """slmkit names -> Hugging Face names, for a model with uniform, unshared layers."""
    family = FAMILY_BY_NAME[cfg.family]
    out = {}
    for ours, theirs in _layer_pairs(family, cfg.n_layers):
        if ours in state and not (ours == "lm_head.weight" and cfg.tie_embeddings):
            t = state[ours]
            out[theirs] = (t - family.norm_offset if _is_norm(ours) and family.norm_offset else t).contiguous()
    return out


# ---- export of shared and layer-wise scaled models as plain, uniform layers -------------------------
def unroll_for_export(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Unroll block sharing (copy each stored block per repeat) and pad layer-wise widths to the widest layer.

    Padding is exact: extra query heads get zero q/k/v rows and zero o_proj columns (their output is zero);
    GQA groups of different sizes are expanded to multi-head; extra FFN channels get zero rows and columns.
    The head count is also padded up to a divisor of dim, which transformers' Llama and Gemma-3 configs require.
    """
    widths = [cfg.heads_of(i) for i in range(cfg.n_stored_layers)]
    n_heads = _heads_dividing(cfg.dim, max(q for q, _ in widths))
    uniform = not (cfg.layer_n_heads or cfg.layer_n_kv_heads or cfg.layer_ffn_dims) and n_heads == cfg.n_heads
    ffn = max(cfg.ffn_of(i) for i in range(cfg.n_stored_layers))
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for layer in range(cfg.n_layers):
        stored = layer // cfg.share_blocks
        block = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"blocks.{stored}.")}
        if not uniform:
            block = _pad_block(block, *widths[stored], n_heads, cfg.ffn_of(stored), ffn, cfg.head_size)
        out.update({f"blocks.{layer}.{k}": v.clone() for k, v in block.items()})
    flat = dict(cfg.to_dict(), share_blocks=1, layer_n_heads=None, layer_n_kv_heads=None, layer_ffn_dims=None,
                sliding_layers=[cfg.is_sliding(i // cfg.share_blocks) for i in range(cfg.n_layers)] if cfg.sliding_layers else None)
    if not uniform:
        flat.update(n_heads=n_heads, n_kv_heads=n_heads, head_dim=cfg.head_size, ffn_dim=ffn)
    return out, ModelConfig.from_dict(flat)


def _heads_dividing(dim: int, heads: int) -> int:
    """The fewest heads, at least `heads`, that divide dim (`heads` itself if none does)."""
    return next((h for h in range(heads, dim + 1) if dim % h == 0), heads)


def _pad_block(block: dict, q_heads: int, kv_heads: int, n_heads: int, ffn: int, ffn_max: int, d: int) -> dict:
    group = q_heads // kv_heads
    out = dict(block)
    for name in ("attn.k_proj.weight", "attn.v_proj.weight", "attn.k_proj.bias", "attn.v_proj.bias"):
        if name in block:  # [K*D, ...] -> [H*D, ...]: each kv head repeated for its query heads
            t = block[name].reshape(kv_heads, d, *block[name].shape[1:]).repeat_interleave(group, dim=0)
            out[name] = _pad_rows(t.reshape(q_heads * d, *block[name].shape[1:]), n_heads * d)
    for name in ("attn.q_proj.weight", "attn.q_proj.bias"):
        if name in block:
            out[name] = _pad_rows(block[name], n_heads * d)
    out["attn.o_proj.weight"] = _pad_rows(block["attn.o_proj.weight"].T, n_heads * d).T
    for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        if name in block:
            out[name] = _pad_rows(block[name], ffn_max)
    out["mlp.down_proj.weight"] = _pad_rows(block["mlp.down_proj.weight"].T, ffn_max).T
    return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    pad = torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype)
    return torch.cat([t, pad])


# ---- GGUF (llama.cpp) ---------------------------------------------------------------------------
_GGUF_GLOBAL = (("embed.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight"),
                ("lm_head.weight", "output.weight"))
_GGUF_LAYER = (("attn_norm.weight", "attn_norm.weight"), ("mlp_norm.weight", "ffn_norm.weight"),
               ("attn.q_proj.weight", "attn_q.weight"), ("attn.k_proj.weight", "attn_k.weight"),
               ("attn.v_proj.weight", "attn_v.weight"), ("attn.o_proj.weight", "attn_output.weight"),
               ("attn.q_proj.bias", "attn_q.bias"), ("attn.k_proj.bias", "attn_k.bias"),
               ("attn.v_proj.bias", "attn_v.bias"),
               ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"),
               ("mlp.down_proj.weight", "ffn_down.weight"))


@dataclass(frozen=True)
class GGUFArch:
    name: str
    family: str
    permute_qk: bool  # llama.cpp's converter interleaves the rotary halves of Q and K rows for llama
    qkv_bias: bool = False


GGUF_ARCHS = {a.name: a for a in (GGUFArch("llama", "llama", True), GGUFArch("qwen2", "qwen2", False, True))}


def gguf_arch(meta: dict) -> GGUFArch:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise SlmError(f"unknown GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHS)}")
    return GGUF_ARCHS[arch]


def config_from_gguf(meta: dict, tensor_names: set[str]) -> ModelConfig:
    arch = gguf_arch(meta)
    a = arch.name

    def get(key, default=None):
        return meta.get(f"{a}.{key}", default)

    n_heads = get("attention.head_count")
    kv = get("attention.head_count_kv", n_heads)
    scaling = RopeScaling()
    if get("rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    try:
        return ModelConfig(
            vocab_size=int(get("vocab_size") or len(meta["tokenizer.ggml.tokens"])), dim=int(get("embedding_length")),
            n_layers=int(get("block_count")), n_heads=int(n_heads), n_kv_heads=int(kv),
            head_dim=int(get("attention.key_length")) if get("attention.key_length") else None,
            ffn_dim=int(get("feed_forward_length")), norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=int(get("context_length", 2048)), rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling, tie_embeddings="output.weight" not in tensor_names, qkv_bias=arch.qkv_bias,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            family=arch.family).validate()
    except (TypeError, KeyError) as exc:
        raise SlmError(f"GGUF metadata incomplete for architecture {a!r}: {exc}") from None


def gguf_pairs(n_layers: int):
    yield from _GGUF_GLOBAL
    for i in range(n_layers):
        for ours, theirs in _GGUF_LAYER:
            yield f"blocks.{i}.{ours}", f"blk.{i}.{theirs}"


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF row order -> llama.cpp's: within each head, rows (first half, second half) become interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama_cpp_permute: [H*D, ...] with interleaved rotary pairs -> halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def state_from_gguf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, meta: dict) -> dict[str, torch.Tensor]:
    arch = gguf_arch(meta)
    out = {}
    for ours, theirs in gguf_pairs(cfg.n_layers):
        if theirs not in tensors:
            continue
        t = tensors[theirs]
        if arch.permute_qk and ours.endswith(("q_proj.weight", "k_proj.weight")):
            t = llama_cpp_unpermute(t, cfg.n_heads if "q_proj" in ours else cfg.kv_heads)
        out[ours] = t
    return out


def state_to_gguf(state: dict[str, torch.Tensor], cfg: ModelConfig, arch_name: str = "llama") -> dict[str, torch.Tensor]:
    arch = GGUF_ARCHS[arch_name]
    out = {}
    for ours, theirs in gguf_pairs(cfg.n_layers):
        if ours not in state or (ours == "lm_head.weight" and cfg.tie_embeddings):
            continue
        t = state[ours]
        if arch.permute_qk and ours.endswith(("q_proj.weight", "k_proj.weight")):
            t = llama_cpp_permute(t, cfg.n_heads if "q_proj" in ours else cfg.kv_heads)
        out[theirs] = t.contiguous()
    return out


def check_complete(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor the model needs is present with the right shape, and nothing is left over."""
    missing = [k for k in expected if k not in state]
    require(not missing, f"{source}: missing tensor(s) {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    for k, v in expected.items():
        require(tuple(state[k].shape) == tuple(v.shape),
                f"{source}: tensor {k} has shape {tuple(state[k].shape)}, the config implies {tuple(v.shape)}")



# ---- PEFT adapter files (adapter_model.safetensors) ----------------------------------------------------
PEFT_PREFIX = "base_model.model."  # PeftModel -> its tuner model -> transformers' *ForCausalLM
# The tensors of one adapted linear: (slmkit suffix, PEFT suffix) after the module's name. No value changes:
# slmkit's q/k rows are in transformers' order (a llama GGUF's row permutation is undone when it is loaded,
# see llama_cpp_unpermute), so the lora_B of q_proj and k_proj is written as it is.
PEFT_LORA = (("lora_A.weight", "lora_A.weight"), ("lora_B.weight", "lora_B.weight"),
             ("lora_magnitude_vector", "lora_magnitude_vector"))  # DoRA's magnitude [out]: no ".weight"
PEFT_PROMPT = (("prompt", "prompt_embeddings"),)  # prompt tuning: [n virtual tokens, C], no prefix


def _module_pairs(cfg: ModelConfig):
    """(slmkit module, transformers module) of every linear of every block."""
    family = FAMILY_BY_NAME[cfg.family]
    linears = [(o[:-len(".weight")], t[:-len(".weight")]) for o, t in family.layer_table
               if o.endswith("proj.weight")]
    for i in range(cfg.n_layers):
        for ours, theirs in linears:
            yield f"blocks.{i}.{ours}", f"model.layers.{i}.{theirs}"


def _check_peft_layout(cfg: ModelConfig) -> None:
    require(cfg.share_blocks == 1 and not (cfg.layer_n_heads or cfg.layer_n_kv_heads or cfg.layer_ffn_dims),
            "PEFT adapter files need plain layers (no shared blocks, no layer-wise widths)")


def state_to_peft(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Adapter tensors under slmkit names (blocks.3.attn.q_proj.lora_A.weight, prompt) -> PEFT's names."""
    _check_peft_layout(cfg)
    names = _peft_names(cfg)
    unknown = sorted(set(state) - set(names))
    require(not unknown, f"no PEFT name for adapter tensor(s) {', '.join(unknown[:3])}")
    return {names[k]: t.contiguous() for k, t in state.items()}


def state_from_peft(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensor names -> slmkit's; a tensor with no slmkit place is refused by name."""
    _check_peft_layout(cfg)
    names = {theirs: ours for ours, theirs in _peft_names(cfg).items()}
    unknown = sorted(k for k in tensors if k not in names)
    require(not unknown, f"{source}: adapter tensor {unknown[0] if unknown else ''} fits no module of this "
            f"{cfg.family} model of {cfg.n_layers} layers (an adapter made for another base?)")
    return {names[k]: t for k, t in tensors.items()}


def _peft_names(cfg: ModelConfig) -> dict[str, str]:
    names = {ours: theirs for ours, theirs in PEFT_PROMPT}
    for ours, theirs in _module_pairs(cfg):
        names.update({f"{ours}.{o}": f"{PEFT_PREFIX}{theirs}.{t}" for o, t in PEFT_LORA})
    return names


def peft_target_names(modules: list[str], cfg: ModelConfig) -> list[str]:
    """slmkit module names -> the short names PEFT's target_modules lists (q_proj, ...), sorted."""
    short = {ours: theirs.rsplit(".", 1)[-1] for ours, theirs in _module_pairs(cfg)}
    return sorted({short[m] for m in modules})
