"""The slmkit decoder: one readable decoder-only transformer built from a `ModelConfig`.

Covers multi-head / grouped-query / multi-query attention, SwiGLU / GeGLU / plain MLPs, RMSNorm / LayerNorm,
RoPE (theta, linear and Llama-3 scaling), tied embeddings, QKV bias, QK-norm, sandwich norms, sliding-window
layers, MobileLLM block-wise layer sharing and OpenELM layer-wise scaling. Shapes: B batch, T new tokens,
S cached + new tokens, H query heads, K kv heads, D head dim, C model width.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .config import ModelConfig, RopeScaling, head_dim_scale
from .losses import IGNORE, linear_cross_entropy

ACTIVATION_FNS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu}


class Linear(nn.Linear):
    """nn.Linear whose few-row CPU inference (decode) uses slmkit's bandwidth-bound kernel when available."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.small_matmul(x, self.weight)
        if y is None:  # weights may be stored narrower than the activations (see cast_weights_)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 and cast back before the weight, as the Hugging Face reference does.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, eps=cfg.norm_eps)


# ---- rotary position embedding -----------------------------------------------------------------
def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [D/2] of RoPE, with the configured scaling applied."""
    # Computed on the CPU even while a model is being built on the meta device (loading fills weights later).
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, blended, out)


def rope_table(head_dim: int, theta: float, scaling: RopeScaling, max_len: int) -> torch.Tensor:
    """cos and signed sin for every position, stacked: [2, max_len, D].

    Each half of D repeats the frequencies; the sin of the first half is negated so that rotating the halves
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) is x * cos + roll(x, D/2) * signed_sin."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), inv_freq)  # [max_len, D/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)]).float()  # [2, max_len, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, signed_sin: [T, D]. Rotates the two halves of D (the Hugging Face layout)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


# ---- KV cache --------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys and values for every executed layer (shared blocks get a slot per repeat)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        self.max_len = max_len
        self.keys, self.values = [], []
        for layer in range(cfg.n_layers):
            _, kv = cfg.heads_of(layer // cfg.share_blocks)
            shape = (batch, kv, max_len, cfg.head_size)  # [B, K, max_len, D]
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))

    def update(self, layer: int, pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, K, T, D] in the first B rows at positions pos..pos+T (pos an int, or a LongTensor [B]
        of each row's own start); return those rows' keys and values so far [B, K, S, D]."""
        B, end = k.shape[0], cache_end(pos, k.shape[2], self.max_len)
        write_rows(self.keys[layer], pos, k)
        write_rows(self.values[layer], pos, v)
        return self.keys[layer][:B, :, :end], self.values[layer][:B, :, :end]

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of rows start..stop, sharing this one's memory: what it stores lands here."""
        view = copy.copy(self)
        view.keys, view.values = [k[start:stop] for k in self.keys], [v[start:stop] for v in self.values]
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src over row dst (continuous batching keeps its live sequences in the first rows)."""
        for t in self.keys + self.values:
            t[dst] = t[src]


def cache_end(pos, T: int, max_len: int) -> int:
    """Positions a cache must expose after storing T tokens at pos (an int or per-row LongTensor [B])."""
    end = (int(pos.max()) if torch.is_tensor(pos) else pos) + T
    if end > max_len:
        raise ValueError(f"KV cache holds {max_len} positions; asked for {end}")
    return end


def write_rows(store: torch.Tensor, pos, x: torch.Tensor) -> None:
    """store [rows, K, max_len, ...] <- x [B, K, T, ...] at positions pos..pos+T of its first B rows; pos an int
    or a LongTensor [B] (row b at pos[b]..pos[b]+T)."""
    B, T = x.shape[0], x.shape[2]
    if not torch.is_tensor(pos):
        store[:B, :, pos:pos + T] = x
        return
    idx = pos[:, None] + torch.arange(T, device=pos.device)  # [B, T]
    store[torch.arange(B, device=pos.device)[:, None], :, idx] = x.transpose(1, 2)  # indexed as [B, T, K, ...]


# ---- blocks ----------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, cfg.head_size
        self.scale = head_dim_scale(cfg)
        self.q_proj = Linear(cfg.dim, n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(n_heads * self.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, pos) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope  # [T, D] each, or [B, 1, T, D] with per-row positions; sin signed (see rope_table)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v)  # [B, K, S, D]
        # mask None: plain causal attention over a fresh sequence (T > 1), or one query that sees every key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # [B, T, C]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int):
        super().__init__()
        self.act = ACTIVATION_FNS[cfg.activation]
        self.gate_proj = Linear(cfg.dim, hidden, bias=False) if cfg.mlp != "mlp" else None
        self.up_proj = Linear(cfg.dim, hidden, bias=False)
        self.down_proj = Linear(hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        n_heads, n_kv_heads = cfg.heads_of(layer)
        self.sliding = cfg.is_sliding(layer)
        self.attn_norm = make_norm(cfg, cfg.dim)
        self.attn = Attention(cfg, n_heads, n_kv_heads)
        self.mlp_norm = make_norm(cfg, cfg.dim)
        self.mlp = MLP(cfg, cfg.ffn_of(layer))
        self.post_attn_norm = make_norm(cfg, cfg.dim) if cfg.sandwich_norm else None
        self.post_mlp_norm = make_norm(cfg, cfg.dim) if cfg.sandwich_norm else None

    def forward(self, x, rope, mask, cache, layer, pos):
        h = self.attn(self.attn_norm(x), rope, mask, cache, layer, pos)
        x = x + (self.post_attn_norm(h) if self.post_attn_norm is not None else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(h) if self.post_mlp_norm is not None else h)


# ---- the model -------------------------------------------------------------------------------
class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.compression: list[dict] = []  # the compression steps applied, as data (see slmkit.pipeline)
        self.kv_scheme = None  # a QScheme: the KV cache is stored quantized (see slmkit.quant.kvcache)
        self.cache_type = KVCache  # what new_cache makes: (cfg, batch, max_len, dtype, device) -> a cache
        self.prompt: nn.Parameter | None = None  # [P, C] virtual tokens before every sequence (prompt tuning)
        self.checkpoint_blocks = False  # training: recompute each block's activations in the backward
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_stored_layers))
        self.norm = make_norm(cfg, cfg.dim)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        rope_len = cfg.max_seq_len
        self.register_buffer("rope", rope_table(cfg.head_size, cfg.rope_theta, cfg.rope_scaling, rope_len),
                             persistent=False)  # [2, max_len, D]
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        self.register_buffer("rope_local", rope_table(cfg.head_size, local_theta, RopeScaling(), rope_len),
                             persistent=False)

    @property
    def output_module(self) -> nn.Module:
        """The output projection: the untied lm_head, or the (tied) embedding table, float or packed."""
        return self.embed if self.lm_head is None else self.lm_head

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of activations: that of the norms, which cast_weights_ leaves in float32."""
        return self.norm.weight.dtype

    @property
    def n_virtual(self) -> int:
        """Virtual (prompt-tuning) positions before every sequence: they take cache slots and positions."""
        return 0 if self.prompt is None else self.prompt.shape[0]

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        max_len = (max_len or self.cfg.max_seq_len - self.n_virtual) + self.n_virtual
        return self.cache_type(self.cfg, batch, max_len, self.compute_dtype, self.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                last_only: bool = False, labels: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions pos..pos+T -> logits [B, T, V] (or [B, 1, V] with last_only). pos is an int,
        or a LongTensor [B] of each row's own start (continuous batching: rows of one batch at different points
        of their sequences, each in its own cache row; rows start past 0, i.e. after their prefill). With labels
        [B, T] (each position's next token, or losses.IGNORE): the summed cross-entropy instead, for training.
        With hidden: the final (normed) hidden states [B, T, C], for losses that apply head_matrix() themselves.
        A prompt-tuned model puts its P virtual tokens before position 0: they are in the cache and in the
        positions (pos counts real tokens only) but never in the output."""
        cfg, P = self.cfg, self.n_virtual
        last = (int(pos.max()) if torch.is_tensor(pos) else pos) + tokens.shape[1] + P
        if last > cfg.max_seq_len:
            raise ValueError(f"sequence of {last} positions exceeds the model's context of {cfg.max_seq_len}")
        fresh = not torch.is_tensor(pos) and pos == 0  # a new sequence: the virtual tokens go first
        x = self.embed(tokens).to(self.compute_dtype)  # [B, T, C]
        if cfg.embed_scale != 1.0:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if P and fresh:
            x = torch.cat([self.prompt.to(x.dtype).expand(x.shape[0], -1, -1), x], 1)  # [B, P + T, C]
        pos = 0 if fresh else pos + P  # where x starts among all positions, virtual ones included
        x = self.run_blocks(x, cache, pos)
        if P and fresh:
            x = x[:, P:]  # [B, T, C]: the virtual positions have no output
        if last_only:
            x = x[:, -1:]  # [B, 1, C]
        if labels is not None:
            return self.loss_sum(self.norm(x), labels)
        if hidden:
            return self.norm(x)  # [B, T, C]
        return self.project(self.norm(x))  # [B, T, V]

    def run_blocks(self, x: torch.Tensor, cache: KVCache | None, pos) -> torch.Tensor:
        """x [B, T, C] at positions pos..pos+T (an int, or per-row starts [B]) through every block (block-wise
        activation checkpointing when training with checkpoint_blocks: each block's inside is recomputed in the
        backward)."""
        cfg, T = self.cfg, x.shape[1]
        if torch.is_tensor(pos):
            idx = pos[:, None] + torch.arange(T, device=pos.device)  # [B, T]
            ropes = {False: self.rope[:, idx].unsqueeze(2), True: self.rope_local[:, idx].unsqueeze(2)}  # [2,B,1,T,D]
            mask_of = row_attention_mask
        else:
            ropes = {False: self.rope[:, pos:pos + T], True: self.rope_local[:, pos:pos + T]}  # [2, T, D] each
            mask_of = attention_mask
        full = mask_of(T, pos, None, x.device)
        masks = {False: full, True: mask_of(T, pos, cfg.sliding_window, x.device) if cfg.sliding_window else full}
        recompute = self.checkpoint_blocks and torch.is_grad_enabled() and cache is None
        for layer in range(cfg.n_layers):
            block = self.blocks[layer // cfg.share_blocks]
            args = (x, ropes[block.sliding], masks[block.sliding], cache, layer, pos)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        return x

    def loss_sum(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, C] and labels [B, T] -> the summed next-token cross-entropy; a float output
        or packed output matrix is applied in chunks (losses.linear_cross_entropy), so the [B, T, V] logits are
        never held."""
        if not getattr(self.output_module, "act_bits", 0):
            return linear_cross_entropy(x.flatten(0, 1), self.head_matrix(), labels.flatten())  # [B*T, C], [B*T]
        logits = self.project(x)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")

    def head_matrix(self) -> torch.Tensor:
        """The output projection as one matrix [V, C]: the float weight (trainable if it is), or a packed table's
        float matrix made for this product only (no grad, not kept)."""
        head = self.output_module
        return head.weight if isinstance(head, (nn.Linear, nn.Embedding)) else head.dequantize()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., C] -> logits [..., V] through the output matrix (tied or not, float or packed)."""
        head = self.output_module
        if self.lm_head is not None:
            return head(x)
        if not isinstance(head, nn.Embedding):  # a packed table (slmkit.quant.packed.QuantEmbedding)
            return head.project(x)
        logits = kernels.small_matmul(x, head.weight)
        return logits if logits is not None else F.linear(x, head.weight.to(x.dtype))


def attention_mask(T: int, pos: int, window: int | None, device=None) -> torch.Tensor | None:
    """Boolean [T, pos+T] mask (True = attend) for causal attention, optionally limited to a sliding window.

    None when no mask is needed: one query that may see every cached key (decode without a binding window),
    or plain causal attention over a fresh sequence (pos 0, no binding window), which attention then runs
    with is_causal (the fused kernels skip the masked half instead of reading a mask)."""
    S = pos + T
    if (T == 1 or pos == 0) and (window is None or S <= window):
        return None
    q_idx = torch.arange(pos, S, device=device)[:, None]  # [T, 1]
    k_idx = torch.arange(S, device=device)[None, :]  # [1, S]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed &= q_idx - k_idx < window
    return allowed


def row_attention_mask(T: int, pos: torch.Tensor, window: int | None, device=None) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask for rows whose T queries start at their own positions pos [B] (S = the
    furthest row's end): row b sees its keys 0..pos[b]+t, nothing another sequence left further on in its row."""
    q_idx = pos[:, None, None] + torch.arange(T, device=device)[None, :, None]  # [B, T, 1]
    k_idx = torch.arange(int(pos.max()) + T, device=device)[None, None, :]  # [1, 1, S]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed &= q_idx - k_idx < window
    return allowed[:, None]  # [B, 1, T, S]


def cast_weights_(model: Decoder, dtype: torch.dtype) -> Decoder:
    """Store the matrices (embeddings and linear weights) in `dtype`; norms, biases and activations stay float32.

    bf16 weights halve the bytes decode reads per token; computing in float32 keeps the elementwise work
    (norms, RoPE, residuals) on torch's fastest CPU path and the numerics close to the float32 model."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data = module.weight.data.to(dtype)
    return model


def count_parameters(model: Decoder) -> dict[str, int]:
    """Parameters split by embeddings (input + untied output), attention, MLP and norms. A packed (quantized)
    matrix counts the entries of the matrix it stands for, so counts do not change with compression."""
    split = {"embedding": 0, "attention": 0, "mlp": 0, "norm": 0}
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False)) + getattr(module, "weight_numel", 0)
        part = ("embedding" if name.startswith(("embed", "lm_head")) else "attention" if ".attn." in name
                else "mlp" if ".mlp." in name else "norm")
        split[part] += own
    split["total"] = sum(split.values())
    return split
