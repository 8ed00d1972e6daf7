"""The one model config: a validated dataclass, plus named presets for from-scratch sizes.

Every architectural choice the decoder supports is a field here; `ModelConfig.validate()` rejects
contradictions with one clear message (an SlmError) before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SlmError, require

MLP_KINDS = ("swiglu", "geglu", "mlp")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
NORMS = ("rmsnorm", "layernorm")
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass
class RopeScaling:
    """RoPE frequency scaling. `kind` none | linear (positions / factor) | llama3 (Llama 3.1 smooth scaling)."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class ModelConfig:
    """A decoder-only transformer. Sizes are per layer unless a per-layer list overrides them."""

    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: multi-head; 1: multi-query; else grouped-query
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 1536
    mlp: str = "swiglu"  # swiglu | geglu (gated) | mlp (plain up -> act -> down)
    activation: str = "silu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's q and k (Qwen3, Gemma-3)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP (Gemma-2/3)
    embed_scale: float = 1.0  # token embeddings multiplied by this (Gemma: sqrt(dim))
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    sliding_window: int | None = None  # window (in tokens) of the layers marked sliding
    sliding_layers: list[bool] | None = None  # per layer; None with a window: every layer slides
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma-3); None: rope_theta
    share_blocks: int = 1  # MobileLLM block-wise sharing: each stored block runs this many times in a row
    layer_n_heads: list[int] | None = None  # OpenELM layer-wise scaling: query heads per layer
    layer_n_kv_heads: list[int] | None = None
    layer_ffn_dims: list[int] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    family: str = "llama"  # which Hugging Face layout export writes: llama | qwen2 | mistral | gemma3

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def n_stored_layers(self) -> int:
        return self.n_layers // self.share_blocks

    def heads_of(self, layer: int) -> tuple[int, int]:
        """(query heads, kv heads) of stored layer `layer`."""
        q = self.layer_n_heads[layer] if self.layer_n_heads else self.n_heads
        if self.layer_n_kv_heads:
            return q, self.layer_n_kv_heads[layer]
        return q, (q if self.layer_n_heads else self.kv_heads)  # per-layer query heads alone: multi-head

    def ffn_of(self, layer: int) -> int:
        return self.layer_ffn_dims[layer] if self.layer_ffn_dims else self.ffn_dim

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.sliding_layers[layer] if self.sliding_layers is not None else True

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "share_blocks"):
            require(getattr(self, name) > 0, f"config: {name} must be positive, got {getattr(self, name)}")
        for name in ("n_kv_heads", "head_dim", "sliding_window"):
            value = getattr(self, name)
            require(value is None or value > 0, f"config: {name} must be positive, got {value}")
        require(self.mlp in MLP_KINDS, f"config: mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        require(self.activation in ACTIVATIONS, f"config: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        require(self.norm in NORMS, f"config: norm must be one of {NORMS}, got {self.norm!r}")
        require(self.rope_scaling.kind in ROPE_SCALINGS, f"config: rope_scaling.kind must be one of {ROPE_SCALINGS}")
        require(self.norm_eps > 0 and self.rope_theta > 0, "config: norm_eps and rope_theta must be positive")
        require(self.head_dim is not None or self.dim % self.n_heads == 0,
                f"config: dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
        require(self.head_size % 2 == 0, f"config: head_dim {self.head_size} must be even for RoPE")
        require(self.n_layers % self.share_blocks == 0,
                f"config: share_blocks {self.share_blocks} does not divide n_layers {self.n_layers}")
        self._validate_per_layer()
        return self

    def _validate_per_layer(self) -> None:
        n = self.n_stored_layers
        for name in ("layer_n_heads", "layer_n_kv_heads", "layer_ffn_dims"):
            values = getattr(self, name)
            require(values is None or len(values) == n, f"config: {name} needs {n} entries (one per stored layer)")
            require(values is None or all(v > 0 for v in values), f"config: {name} entries must be positive")
        require(self.sliding_layers is None or len(self.sliding_layers) == n,
                f"config: sliding_layers needs {n} entries")
        for layer in range(n):
            q, kv = self.heads_of(layer)
            require(q % kv == 0, f"config: n_kv_heads {kv} does not divide n_heads {q}"
                    + (f" in layer {layer}" if self.layer_n_heads or self.layer_n_kv_heads else ""))

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SlmError(f"config: unknown field(s) {', '.join(unknown)}")
        data = dict(data)
        data["rope_scaling"] = RopeScaling(**data.get("rope_scaling", {}) or {})
        try:
            return cls(**data).validate()
        except TypeError as exc:
            raise SlmError(f"config: {exc}") from None


def layerwise_scaling(n_layers: int, dim: int, head_dim: int, alpha: tuple[float, float] = (0.5, 1.0),
                      beta: tuple[float, float] = (0.5, 4.0), gqa_group: int = 1) -> dict[str, list[int]]:
    """OpenELM layer-wise scaling: heads and FFN width grow linearly from the first layer to the last.

    Layer i gets n_heads = round(alpha_i * dim / head_dim) and ffn = round(beta_i * dim), with alpha_i, beta_i
    interpolated linearly between the given (min, max). Heads are rounded to a multiple of `gqa_group`.
    """
    heads, kv_heads, ffn = [], [], []
    for i in range(n_layers):
        t = i / max(n_layers - 1, 1)
        a = alpha[0] + (alpha[1] - alpha[0]) * t
        b = beta[0] + (beta[1] - beta[0]) * t
        h = max(gqa_group, int(round(a * dim / head_dim / gqa_group)) * gqa_group)
        heads.append(h)
        kv_heads.append(h // gqa_group)
        ffn.append(int(2 * round(b * dim / 2)))
    return {"layer_n_heads": heads, "layer_n_kv_heads": kv_heads, "layer_ffn_dims": ffn}


PRESETS: dict[str, dict[str, Any]] = {
    # name: fields. Parameter counts (tied embeddings, 32k vocabulary) are printed by `slm info preset:NAME`.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    "nano-20m": dict(vocab_size=32000, dim=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=768),
    "mobilellm-50m": dict(vocab_size=32000, dim=384, n_layers=24, n_heads=6, n_kv_heads=2, ffn_dim=1024,
                          share_blocks=2),
    "small-125m": dict(vocab_size=32000, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                       rope_theta=100000.0),
    "openelm-style-100m": dict(vocab_size=32000, dim=512, n_layers=16, n_heads=8, n_kv_heads=2, ffn_dim=2048,
                               **layerwise_scaling(16, 512, 64, gqa_group=2)),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named from-scratch config (see PRESETS), with field overrides."""
    if name not in PRESETS:
        raise SlmError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides}).validate()


def head_dim_scale(cfg: ModelConfig) -> float:
    return cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.head_size)
