"""Merging a LoRA adapter into its base, as a recorded step whose cost is measured: the KL divergence between
the adapted model (base + adapter, unmerged) and the merged one, on held-out text. Into a float base the merge
is exact up to float rounding; into a packed base it re-quantizes, and the KL says what that costs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..calib import CalibConfig, calibration_tokens
from ..checkpoint import save_checkpoint
from ..errors import require
from ..eval.fidelity import kl_stats
from ..records import step_record
from ..quant.packed import QuantLinear
from .files import load_adapted, load_adapter_
from .lora import lora_modules, merge_lora_

KL_TEXT = CalibConfig("wikitext2-valid", samples=8, length=256)  # held-out text: not what perplexity is measured on


@dataclass
class MergeStep:
    """Put the adapter of `adapter` (a PEFT-format folder) on the model and fold it into the base."""

    adapter: str = ""
    calib: CalibConfig = field(default_factory=lambda: KL_TEXT)  # the text the merge's KL is measured on
    result: dict | None = None  # filled when applied: modules merged, packed or float base, KL
    method: ClassVar[str] = "merge_lora"
    needs_calibration: ClassVar[bool] = True

    def apply_(self, model: nn.Module, tokens: torch.Tensor) -> None:
        if not lora_modules(model) and model.prompt is None:  # a bare base: the adapter goes on first
            load_adapter_(model, Path(self.adapter))
        self.result = merge_measured_(model, tokens)


def merge_step(model: nn.Module, adapter: Path | str) -> MergeStep:
    """The merge step of `adapter` for `model`, its KL text in windows that fit the model's context."""
    text = dataclasses.replace(KL_TEXT, length=min(KL_TEXT.length, model.cfg.max_seq_len))
    return MergeStep(str(Path(adapter).resolve()), text)


@torch.no_grad()
def merge_measured_(model: nn.Module, tokens: torch.Tensor) -> dict:
    """merge_lora_ with the KL(adapted || merged) per token on `tokens` [N, T] measured around it."""
    adapted = lora_modules(model)
    require(bool(adapted), "the model has no LoRA adapter to merge (prompt tuning cannot be merged)")
    packed = sum(isinstance(m.base, QuantLinear) for _, m in adapted)
    before = _logprobs(model, tokens)
    names = merge_lora_(model)
    kl, same = kl_stats(before, _logprobs(model, tokens))
    return {"modules": len(names), "packed_bases": packed, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(same.float().mean()), "kl_tokens": int(kl.numel())}


def _logprobs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(row[None]).double(), -1)[0] for row in tokens])  # [N*T, V]


def merge(adapter: Path, out: Path, base: str | None = None, force: bool = False) -> tuple[Path, dict]:
    """`slm merge`: base + adapter -> a merged slmkit checkpoint at `out`, its history ending with the step."""
    require(force or not Path(out).exists(), f"{out} exists; pass --force to replace it")
    lm = load_adapted(Path(adapter), base=base)
    step = merge_step(lm.model, adapter)
    step.apply_(lm.model, calibration_tokens(lm.tokenizer, step.calib))
    lm.model.compression.append(step_record(step))
    return save_checkpoint(lm.model, lm.tokenizer, Path(out), force=force), step.result
