"""Unstructured and N:M pruning of a model's linear layers: magnitude, Wanda, SparseGPT, as one pipeline step.

    prune_(model, PruneConfig("wanda", sparsity=0.5), calib_tokens)
    prune_(model, PruneConfig("sparsegpt", pattern=(2, 4)), calib_tokens)

Pruned weights become exact zeros in the float matrices: the model keeps its shapes, so every later step
(GPTQ keeps the zeros zero), export and loader works as before. The zeros alone save no time or memory in
dense kernels; `save_checkpoint(..., sparse_storage=True)` stores them compressed on disk (see storage.py).
Wanda and SparseGPT calibrate layer by layer (slmkit.calib): one pass per block gathers each input group's
statistics, the block's linears are pruned, and the pruned block makes the next block's inputs (so they prune
the decoder blocks' linears; magnitude pruning, which reads no data, prunes whatever the filter selects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, NamedTuple

import torch
from torch import nn

from ..calib import CalibConfig, InputStats, capture, layerwise
from ..errors import require
from ..modules import LayerFilter, block_groups, is_matrix, named_linears
from ..progress import progress
from .scores import Pattern, check_pattern, check_sparsity, magnitude_scores, select_mask, sparsegpt_prune, wanda_scores


@dataclass
class PruneConfig:
    algorithm: str = "wanda"  # magnitude | wanda | sparsegpt (see PRUNERS)
    sparsity: float | None = None  # fraction of each comparison group set to zero; None: 0.5 (or the pattern's)
    pattern: Pattern | None = None  # (N, M): keep N of every M consecutive input columns of each row
    per_layer: bool = False  # compare scores across the whole layer instead of within each output row
    layer_sparsity: tuple[float, ...] | None = None  # one target per decoder block (layer-wise), else uniform
    damp: float = 0.01  # sparsegpt: fraction of the mean Hessian diagonal added before inverting
    block_size: int = 128  # sparsegpt: columns per mask / lazy-update block
    layers: LayerFilter = field(default_factory=LayerFilter)
    calib: CalibConfig = field(default_factory=CalibConfig)
    method: ClassVar[str] = "prune"

    @property
    def needs_calibration(self) -> bool:
        return self.pruner.calibrates

    @property
    def pruner(self) -> "Pruner":
        require(self.algorithm in PRUNERS, f"unknown pruning method {self.algorithm!r}; known: {', '.join(PRUNERS)}")
        return PRUNERS[self.algorithm]

    @property
    def fraction(self) -> float:
        """The share of weights pruned: the sparsity, or 1 - N/M for a pattern."""
        if self.pattern is not None:
            return 1 - self.pattern[0] / self.pattern[1]
        return 0.5 if self.sparsity is None else self.sparsity

    def fraction_of(self, name: str) -> float:
        """The share pruned in linear `name` (blocks.I....): block I's layer-wise target, else the uniform one."""
        if self.layer_sparsity is None or not name.startswith("blocks."):
            return self.fraction
        return self.layer_sparsity[int(name.split(".")[1])]

    def describe(self) -> str:
        shape = f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"{self.fraction:.0%}"
        if self.layer_sparsity is not None:
            shape = f"{sum(self.layer_sparsity) / len(self.layer_sparsity):.0%} on average, layer-wise"
        return f"{self.algorithm} {shape}"

    def validate(self) -> "PruneConfig":
        self.pruner  # refuses an unknown algorithm
        require(self.sparsity is None or self.pattern is None, "give a sparsity or an N:M pattern, not both")
        check_sparsity(self.fraction)
        check_pattern(self.pattern)
        if self.layer_sparsity is not None:
            require(self.pattern is None and self.sparsity is None, "layer-wise sparsity targets replace "
                    "--sparsity and do not combine with an N:M pattern")
            for target in self.layer_sparsity:
                check_sparsity(target)
        require(0 <= self.damp < 1 and self.block_size >= 1, f"prune: damp must be in [0, 1) and block size >= 1, "
                f"got {self.damp} and {self.block_size}")
        return self

    def apply_(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        self.validate()
        linears = _float_linears(model, self.layers)
        for name, linear in linears:
            check_pattern(self.pattern, linear.in_features)
        n_blocks = len(model.blocks)
        require(self.layer_sparsity is None or len(self.layer_sparsity) == n_blocks,
                f"layer-wise sparsity needs one target per block ({n_blocks}), got {len(self.layer_sparsity or ())}")
        if not self.needs_calibration:
            for name, linear in progress(linears, f"pruning {self.describe()}"):
                prune_linear_(linear, None, self, self.fraction_of(name))
            return
        for i, block, run in layerwise(model, calib, f"pruning {self.describe()}"):
            groups = [g for g in block_groups(block) if any(self.layers(f"blocks.{i}.{n}") for n in g.names)]
            with capture(block, groups, hessian=self.pruner.hessian) as stats:
                run()
            for group, st in zip(groups, stats):
                for n in group.names:
                    if self.layers(f"blocks.{i}.{n}"):
                        prune_linear_(block.get_submodule(n), st, self, self.fraction_of(f"blocks.{i}.{n}"))


def _float_linears(model: nn.Module, layers: LayerFilter) -> list[tuple[str, nn.Linear]]:
    """The float linears the filter selects; pruning reads float weights, so a selected packed one is refused."""
    packed = [n for n, m in model.named_modules() if is_matrix(m) and not isinstance(m, nn.Linear) and layers(n)]
    require(not packed, f"{packed[0] if packed else ''} is already quantized; prune before quantizing")
    return named_linears(model, layers)


def prune_linear_(linear: nn.Linear, stats: InputStats | None, cfg: PruneConfig, fraction: float) -> None:
    """Replace the linear's weights by their pruned version (same dtype, exact zeros), `fraction` of them pruned
    (ignored under an N:M pattern, which fixes it)."""
    W = linear.weight.data
    linear.weight.data = cfg.pruner.prune(W.float(), stats, cfg, fraction).to(W.dtype)


def _magnitude(W: torch.Tensor, stats: InputStats | None, cfg: PruneConfig, fraction: float) -> torch.Tensor:
    return W * select_mask(magnitude_scores(W), fraction, cfg.pattern, cfg.per_layer)


def _wanda(W: torch.Tensor, stats: InputStats, cfg: PruneConfig, fraction: float) -> torch.Tensor:
    return W * select_mask(wanda_scores(W, stats.mean_sq), fraction, cfg.pattern, cfg.per_layer)


def _sparsegpt(W: torch.Tensor, stats: InputStats, cfg: PruneConfig, fraction: float) -> torch.Tensor:
    return sparsegpt_prune(W, stats.hessian, fraction, cfg.pattern, cfg.block_size, cfg.damp, cfg.per_layer)


class Pruner(NamedTuple):
    prune: Callable[[torch.Tensor, InputStats | None, PruneConfig, float], torch.Tensor]  # W [out, n] -> pruned
    calibrates: bool  # needs the inputs' statistics
    hessian: bool  # ... including X^T X


PRUNERS = {"magnitude": Pruner(_magnitude, calibrates=False, hessian=False),
           "wanda": Pruner(_wanda, calibrates=True, hessian=False),
           "sparsegpt": Pruner(_sparsegpt, calibrates=True, hessian=True)}


def parse_pattern(text: str) -> Pattern:
    """'2:4' -> (2, 4)."""
    n, sep, m = text.partition(":")
    require(sep == ":" and n.strip().isdigit() and m.strip().isdigit(), f"N:M pattern must look like 2:4, got {text!r}")
    pattern = (int(n), int(m))
    check_pattern(pattern)
    return pattern


def prune_(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor | None = None) -> nn.Module:
    """Apply one pruning step in place (recorded in model.compression); calib: [N, T] token ids for Wanda and
    SparseGPT (see slmkit.calib.calibration_tokens)."""
    from ..pipeline import apply_step_

    apply_step_(model, cfg, calib)
    return model
