"""LoRA: low-rank adapters on linear layers, float or packed (QLoRA), as in-place verbs.

`apply_lora_(model, LoRAConfig)` puts a LoRALinear where each selected linear was:
    y = base(x) + s * B(A(dropout(x)))
with A [r, in] Kaiming-uniform and B [out, r] zero (so the adapted model starts equal to its base, as PEFT
initialises), s = alpha / r, or alpha / sqrt(r) with rsLoRA. A and B are plain nn.Linear layers named
`lora_A` / `lora_B`, so their state keys are PEFT's and per-sample-gradient hooks (DP-SGD) see ordinary
linears. The base stays what it was and is frozen: a float Linear, or a packed QuantLinear whose float matrix
is made for one product and dropped (slmkit.quant.packed: no float copy outlives the product, in the forward
or the backward). `merge_lora_` folds s * B @ A back into the base: exactly into a float one; into a packed
one by dequantizing, adding and re-quantizing with the base's own scheme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import require
from ..modules import LayerFilter, is_matrix, set_module
from ..quant.packed import QuantLinear
from ..quant.scheme import quantize_weight

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layers: LayerFilter = field(default_factory=LayerFilter)  # default: every linear of every block (all seven)
    rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row as well
    method: ClassVar[str] = "lora"
    needs_calibration: ClassVar[bool] = False

    def validate(self) -> "LoRAConfig":
        require(isinstance(self.rank, int) and self.rank > 0, f"LoRA rank must be a positive integer, got {self.rank}")
        require(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0,
                f"LoRA alpha must be positive, got {self.alpha}")
        require(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}")
        return self

    def apply_(self, model: nn.Module, _inputs=None) -> None:
        apply_lora_(model, self)


def targets(names: str) -> LayerFilter:
    """`q_proj,v_proj` (short names) or glob patterns on qualified names -> the layer filter that selects them."""
    parts = [p.strip() for p in names.split(",") if p.strip()]
    require(bool(parts), "--lora-targets names no module")
    return LayerFilter(tuple(p if "." in p or "*" in p else f"blocks.*.{p}" for p in parts))


class LoRALinear(nn.Module):
    """A frozen base linear (float or packed) plus a trainable low-rank update s * B @ A. With DoRA, a trainable
    magnitude m [out] rescales each output row of the adapted matrix: W' = m * (W + sBA) / ||W + sBA||_row,
    the row norm taken as a constant in the backward (DoRA's section 4.3, as PEFT does)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False):
        super().__init__()
        self.base, self.alpha, self.rslora, self.dropout_p = base, alpha, rslora, dropout
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(iter(base.buffers() if isinstance(base, QuantLinear) else base.parameters())).device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)  # weight [r, in]
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)  # weight [out, r]
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_magnitude_vector = nn.Parameter(self._base_weight().norm(dim=1)) if dora else None  # [out]

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        delta = (self.lora_B(self.lora_A(self.dropout(x))) * self.scaling).to(y.dtype)  # [..., out]
        if self.lora_magnitude_vector is None:
            return y + delta
        bias = self.base.bias
        plain = y if bias is None else y - bias.to(y.dtype)
        scale = (self.lora_magnitude_vector / self._row_norm()).to(y.dtype)  # [out]
        return scale * (plain + delta) + (0 if bias is None else bias.to(y.dtype))

    def _base_weight(self) -> torch.Tensor:
        base = self.base
        return base.dequantize() if isinstance(base, QuantLinear) else base.weight.detach().float()  # [out, in]

    def _row_norm(self) -> torch.Tensor:
        """||W + s B A|| of every output row [out], without gradient."""
        with torch.no_grad():
            return (self._base_weight() + self.delta_weight()).norm(dim=1)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in float32: the [out, in] update the adapter adds to the base matrix."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The float32 [out, in] matrix base + adapter stand for (DoRA: rescaled row by row)."""
        weight = self._base_weight() + self.delta_weight()
        if self.lora_magnitude_vector is None:
            return weight
        return weight * (self.lora_magnitude_vector.float() / weight.norm(dim=1))[:, None]

    def extra_repr(self) -> str:
        return f"rank {self.rank}, scaling {self.scaling:g}"


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """A [r, in], B [out, r] -> s * B @ A [out, in] (float32)."""
    return (B.float() @ A.float()) * scaling


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora_(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every linear (float or packed) that cfg.layers selects in a LoRALinear and freeze everything
    else; returns their names. Refuses a model that already has adapters, a filter that matches nothing and a rank above a matrix's."""
    cfg.validate()
    require(not lora_modules(model), "the model already has LoRA adapters; merge them first (slm merge)")
    chosen = [(n, m) for n, m in model.named_modules() if is_matrix(m) and n and cfg.layers(n)]
    names = [n for n, _ in model.named_modules() if is_matrix(_) and n]
    require(bool(chosen), f"LoRA targets {list(cfg.layers.include)} match no linear layer; the model's are like "
            f"{', '.join(sorted({n.split('.', 2)[-1] for n in names})[:8])}")
    for name, module in chosen:
        smallest = min(module.in_features, module.out_features)
        require(cfg.rank <= smallest, f"LoRA rank {cfg.rank} exceeds {name}'s smaller side ({smallest})")
    for p in model.parameters():
        p.requires_grad_(False)  # as PEFT does: the adapters alone train
    for name, module in chosen:
        set_module(model, name, LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora))
    return [n for n, _ in chosen]


def adapter_parameters(model: nn.Module) -> tuple[str, ...]:
    """Glob patterns of the adapter parameters (what trains when a model is adapted)."""
    patterns = ("*.lora_A.weight", "*.lora_B.weight", "*.lora_magnitude_vector") if lora_modules(model) else ()
    return patterns + (("prompt",) if getattr(model, "prompt", None) is not None else ())


def refuse_adapted(model: nn.Module, action: str) -> None:
    """One line instead of a wrong result: compression and export take plain models (LoRA adapters are merged
    into them first by the caller); virtual prompt tokens have no weights to fold into."""
    require(not lora_modules(model) and getattr(model, "prompt", None) is None,
            f"{action} takes a plain model or a LoRA adapter (merged first); a prompt-tuning adapter has no "
            "weights to fold in")


@torch.no_grad()
def merge_lora_(model: nn.Module) -> list[str]:
    """Fold every adapter into its base and put the base back in its place; returns the merged names.
    Float bases: W + s * B @ A (DoRA: rescaled per row), computed in float32 and stored in W's dtype. Packed bases: the dequantized
    matrix plus the update, re-quantized (round-to-nearest with the MSE scale search) in the base's scheme."""
    merged = []
    for name, m in lora_modules(model):
        base, weight = m.base, m.merged_weight()
        if isinstance(base, QuantLinear):
            base = _requantized(base, weight)
        else:
            base.weight.data = weight.to(base.weight.dtype)
        set_module(model, name, base)
        merged.append(name)
    return merged


def _requantized(base: QuantLinear, weight: torch.Tensor) -> QuantLinear:
    codes, scales, offsets = quantize_weight(weight, base.scheme)
    new = QuantLinear(base.in_features, base.out_features, base.scheme, base.bias is not None, base.act_bits)
    if base.bias is not None:
        new.bias.data = base.bias.data.clone()
    return new.set_codes(codes, scales, offsets)
