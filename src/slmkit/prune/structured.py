"""Structured pruning: remove attention heads, MLP channels, hidden channels or whole blocks, as one pipeline step.

    prune_structured_(model, StructuredPruneConfig("auto", ratio=0.25), calib_tokens)
    prune_structured_(model, StructuredPruneConfig("heads", target_params=parse_count("90M")), calib_tokens)
    prune_structured_(model, StructuredPruneConfig(ffn_dim=1024, n_layers=24, importance="magnitude"))

The result is a smaller *dense* model with a valid config (it saves, loads, generates and exports to Hugging
Face / GGUF like any other), so the savings are real: fewer parameters, a smaller file, less work per token.

Widths are uniform: every layer keeps the same number of query heads and MLP channels (which ones differ per
layer, by importance), so the config stays plain and exports need no padding. Choices made here:

* GQA: query heads are removed evenly *within* KV groups, never a KV head: every group keeps the same number
  of its best query heads (`keep_heads`), the KV cache is unchanged. With multi-head attention each head is
  its own group, so whole heads (q, k, v and o) go. A target that would leave a group without a query head
  is refused.
* MLP widths are multiples of 8 (`mlp_multiple`; when the model's is at least twice that); hidden widths multiples of the head count
  (so heads still divide the width and exports stay plain layouts).
* `auto` cuts in a fixed order, each axis down to a floor before the next one starts: MLP channels first (down
  to half the width; Minitron finds MLP width the most forgiving), then whole blocks, least important first.
  Heads and hidden channels are left to their own axes: on SmolLM2-135M (activation importance, no healing,
  WikiText-2 PPL 27.0 unpruned) one query head of each group in every layer (4.9% of the parameters) took
  perplexity to ~580, and hidden width 504 (12.5%) to 87, against 45 for MLP width 1152 (14.8%) and 50 for
  26 of 30 layers (10.5%); MLP 768 plus 6 query heads reached ~35,000.

A target is a ratio of the parameters `slm info` counts (ratio 0.25 leaves at most 75%), a parameter count, or
explicit widths (heads, ffn_dim, dim, n_layers; the axis is then not consulted). The result never has more
parameters than the target. Importance: see importance.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..calib import CalibConfig
from ..errors import SlmError, require
from ..model import count_parameters
from ..modules import is_matrix
from .importance import Importance, activation_importance, keep_heads, magnitude_importance, top_indices
from .slicing import Keep, meta_decoder, slice_model_, sliced_config

AXES = ("heads", "mlp", "hidden", "layers", "auto")
IMPORTANCES = ("activation", "magnitude")
AUTO_FLOORS = (("mlp", 0.5), ("layers", 0.0))  # auto: each axis in turn, down to this share of its width
MLP_STEP = 8
UNIT_NAMES = {"heads": "query head of a group", "mlp": "MLP channel", "hidden": "hidden channel", "layers": "layer"}


@dataclass(frozen=True)
class Widths:
    """The uniform shape of a (pruned) model."""

    dim: int
    heads: int  # query heads per layer
    ffn_dim: int
    n_layers: int  # stored blocks


AXIS_FIELD = {"heads": "heads", "mlp": "ffn_dim", "hidden": "dim", "layers": "n_layers"}


@dataclass
class StructuredPruneConfig:
    axis: str = "auto"  # heads | mlp | hidden | layers | auto (see the module docstring)
    ratio: float | None = None  # share of the parameters to remove, in (0, 1)
    target_params: int | str | None = None  # at most this many parameters remain ("90M" and "1.2B" accepted)
    heads: int | None = None  # explicit widths instead of a target: query heads per layer
    ffn_dim: int | None = None
    dim: int | None = None
    n_layers: int | None = None
    importance: str = "activation"  # activation (calibration pass) | magnitude (weights only)
    mlp_multiple: int = MLP_STEP  # MLP widths are multiples of this (32: the down projection's input then fits
    #                               group-32 quantization and GGUF's 32-wide blocks)
    calib: CalibConfig = field(default_factory=CalibConfig)
    method: ClassVar[str] = "prune_structured"

    @property
    def needs_calibration(self) -> bool:
        return self.importance == "activation"

    @property
    def explicit(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k in AXIS_FIELD.values() and v is not None}

    def validate(self) -> "StructuredPruneConfig":
        require(self.axis in AXES, f"structured pruning axis must be one of {', '.join(AXES)}, got {self.axis!r}")
        require(self.importance in IMPORTANCES, f"importance must be one of {', '.join(IMPORTANCES)}, "
                f"got {self.importance!r}")
        given = [self.ratio is not None, self.target_params is not None, bool(self.explicit)]
        require(sum(given) == 1, "structured pruning needs exactly one target: a ratio, a parameter count or "
                "explicit widths")
        require(self.ratio is None or 0 < self.ratio < 1, f"ratio must be in (0, 1), got {self.ratio}")
        require(isinstance(self.mlp_multiple, int) and 1 <= self.mlp_multiple <= 4096,
                f"mlp_multiple must be an integer in 1..4096, got {self.mlp_multiple!r}")
        if self.target_params is not None:
            self.target_params = parse_count(self.target_params)
        for name, value in self.explicit.items():
            axis = next(a for a, f in AXIS_FIELD.items() if f == name)
            require(value > 0, f"{name}={value} would remove every {UNIT_NAMES[axis]}")
        return self

    def apply_(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        prune_structured_model_(model, self, calib)


def parse_count(text: int | str) -> int:
    """A parameter count: 90000000, "90M", "1.2B", "500k" (k, M, B or G; case-insensitive) -> int."""
    if isinstance(text, int) and not isinstance(text, bool):
        require(text > 0, f"parameter count must be positive, got {text}")
        return text
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmbg]?)", str(text).strip().replace("_", "").lower())
    require(match is not None, f"parameter count must look like 90M, 1.2B or 90000000, got {text!r}")
    value = round(float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match[2]])
    require(value > 0, f"parameter count must be positive, got {text!r}")
    return value


# ---- checks -----------------------------------------------------------------------------------------
def check_prunable(model: nn.Module, step: StructuredPruneConfig) -> None:
    """Refuse models whose structure slicing cannot keep: shared blocks, packed weights, per-layer widths on the
    axes that would have to stay per layer."""
    cfg = model.cfg
    require(cfg.share_blocks == 1, "structured pruning of shared blocks (share_blocks > 1) is not supported: one "
            "stored block runs as several layers, each would want other heads and channels")
    packed = [n for n, m in model.named_modules() if is_matrix(m) and not isinstance(m, nn.Linear)]
    require(not packed and isinstance(model.embed, nn.Embedding), "the model is quantized; prune before quantizing")
    widths = changed_widths(step)
    require(cfg.embed_scale == 1.0 or "dim" not in widths, "hidden-channel pruning of a model with embed_scale "
            "(Gemma: sqrt(width)) is not supported: exports tie the scale to the width")
    layerwise = cfg.layer_n_heads or cfg.layer_n_kv_heads or cfg.layer_ffn_dims
    require(not layerwise or not widths & {"heads", "ffn_dim"}, "structured head / MLP pruning needs uniform "
            "widths; this model has layer-wise widths (layer_n_heads / layer_ffn_dims): prune hidden channels or "
            "layers instead")


def changed_widths(step: StructuredPruneConfig) -> set[str]:
    """The Widths fields the step may change."""
    if step.explicit:
        return set(step.explicit)
    return {AXIS_FIELD[a] for a, _ in AUTO_FLOORS} if step.axis == "auto" else {AXIS_FIELD[step.axis]}


def target_of(step: StructuredPruneConfig, total: int) -> int:
    """The most parameters the result may have."""
    target = math.floor(total * (1 - step.ratio)) if step.ratio is not None else step.target_params
    require(target < total, f"target of {target:,} parameters is not below the model's {total:,}: nothing to prune")
    return target


# ---- widths for a target ----------------------------------------------------------------------------
def model_widths(cfg) -> Widths:
    return Widths(cfg.dim, cfg.n_heads, cfg.ffn_dim, cfg.n_stored_layers)


def config_for(cfg, w: Widths, order: list[int]):
    """The config of cfg cut to widths w, keeping the first w.n_layers blocks of `order` (most important first)."""
    return sliced_config(cfg, w.dim, w.heads, w.ffn_dim, sorted(order[:w.n_layers]))


def count_for(cfg, w: Widths, order: list[int]) -> int:
    return count_parameters(meta_decoder(config_for(cfg, w, order)))["total"]


def head_unit(cfg) -> int:
    """Query heads removed at a time: one per KV group (GQA), or one head (multi-head attention)."""
    return 1 if cfg.kv_heads == cfg.n_heads else cfg.kv_heads


def candidates(cfg, axis: str, w: Widths, floor: float = 0.0, mlp_multiple: int = MLP_STEP) -> list[Widths]:
    """Every smaller width on `axis`, widest first, down to `floor` times the current one (at least one unit)."""
    current = getattr(w, AXIS_FIELD[axis])
    unit = {"heads": head_unit(cfg), "mlp": mlp_multiple if current >= 2 * mlp_multiple else 1, "hidden": w.heads,
            "layers": 1}[axis]
    lowest = max(unit, unit * math.ceil(current * floor / unit))
    top = (current - 1) // unit * unit  # the widest multiple of the unit below the current width
    return [dataclasses.replace(w, **{AXIS_FIELD[axis]: v}) for v in range(top, lowest - 1, -unit)]


def widest_fitting(cfg, options: list[Widths], target: int, order: list[int]) -> Widths | None:
    """The first (widest) option with at most `target` parameters; counts fall along the list (binary search)."""
    lo, hi = 0, len(options)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_for(cfg, options[mid], order) <= target:
            hi = mid
        else:
            lo = mid + 1
    return options[lo] if lo < len(options) else None


def plan(cfg, step: StructuredPruneConfig, target: int | None, order: list[int]) -> Widths:
    """The widths the result will have: explicit ones, or the widest on the step's axis (auto: axes in turn) whose
    parameter count meets the target."""
    if target is None:
        return explicit_widths(cfg, step)
    axes = AUTO_FLOORS if step.axis == "auto" else ((step.axis, 0.0),)
    w = model_widths(cfg)
    for axis, floor in axes:
        options = candidates(cfg, axis, w, floor, step.mlp_multiple)
        best = widest_fitting(cfg, options, target, order)
        if best is not None:
            return best
        w = options[-1] if options else w  # this axis at its floor; the next one takes the rest
    last = axes[-1][0]
    raise SlmError(f"structured {step.axis}: a target of {target:,} parameters would remove every "
                   f"{UNIT_NAMES[last]} (the smallest model this axis reaches has {count_for(cfg, w, order):,})")


def explicit_widths(cfg, step: StructuredPruneConfig) -> Widths:
    full = model_widths(cfg)
    w = dataclasses.replace(full, **step.explicit)
    for name, value in step.explicit.items():
        require(value <= getattr(full, name), f"{name}={value} is wider than the model's {getattr(full, name)}")
    unit = head_unit(cfg)
    require(w.heads % unit == 0, f"heads={w.heads}: GQA keeps the same number of query heads in each of the "
            f"{unit} KV groups, so heads must be a multiple of {unit}")
    require(w != full, "the explicit widths are the model's own: nothing to prune")
    return w


# ---- the step ----------------------------------------------------------------------------------------
def select(cfg, scores: Importance, w: Widths, order: list[int]) -> Keep:
    """The units to keep for widths w: the best of each kind by score (heads: the best of each GQA group)."""
    layers = sorted(order[:w.n_layers])
    uniform = not (cfg.layer_n_heads or cfg.layer_n_kv_heads or cfg.layer_ffn_dims)
    heads, kv_heads, channels = [], [], []
    for i in layers:
        q, kv = cfg.heads_of(i)
        n = w.heads if uniform else q
        if q == kv:  # multi-head: each head is its own group and takes its kv head with it
            heads.append(top_indices(scores.heads[i], n))
            kv_heads.append(heads[-1])
        else:
            heads.append(keep_heads(scores.heads[i], kv, n // kv))
            kv_heads.append(torch.arange(kv))
        channels.append(top_indices(scores.channels[i], w.ffn_dim if uniform else cfg.ffn_of(i)))
    return Keep(top_indices(scores.hidden, w.dim), layers, heads, kv_heads, channels)


def importance_of(model: nn.Module, step: StructuredPruneConfig, calib: torch.Tensor | None) -> Importance:
    """The step's importance scores of every unit of the model (activation: one pass over `calib` [N, T])."""
    if step.importance == "magnitude":
        return magnitude_importance(model)
    require(calib is not None, "activation importance needs calibration tokens")
    return activation_importance(model, calib)


def prune_structured_model_(model: nn.Module, step: StructuredPruneConfig, calib: torch.Tensor | None,
                            scores: Importance | None = None) -> None:
    """Score, plan and slice in place (not recorded; see prune_structured_). Impossible targets are refused
    before the calibration pass. `scores`: this model's importance, already computed (`importance_of`), to
    prune copies of one model to several targets after a single calibration pass."""
    step.validate()
    check_prunable(model, step)
    cfg, total = model.cfg, count_parameters(model)["total"]
    target = None if step.explicit else target_of(step, total)
    w = plan(cfg, step, target, list(range(cfg.n_stored_layers)))  # before the calibration pass: fail fast
    scores = scores if scores is not None else importance_of(model, step, calib)
    order = scores.layers.argsort(descending=True, stable=True).tolist()  # most important block first
    if cfg.layer_n_heads or cfg.layer_n_kv_heads or cfg.layer_ffn_dims:  # which blocks go changes the count
        w = plan(cfg, step, target, order)
    slice_model_(model, select(cfg, scores, w, order), config_for(cfg, w, order))
    assert target is None or count_parameters(model)["total"] <= target


def prune_structured_(model: nn.Module, cfg: StructuredPruneConfig, calib: torch.Tensor | None = None) -> nn.Module:
    """Apply one structured pruning step in place (recorded in model.compression); calib: [N, T] token ids for
    activation importance (see slmkit.calib.calibration_tokens)."""
    from ..pipeline import apply_step_

    apply_step_(model, cfg, calib)
    return model
