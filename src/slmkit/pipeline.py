"""A pipeline is data: an ordered list of step configs (compression and training alike). Running it is a loop.

Each step config is a dataclass with a `method` name and `apply_(model, inputs)`. A compression step has
`needs_calibration` and a `calib` CalibConfig: its inputs are calibration tokens (or None). A step that needs
other inputs says so with `inputs(tokenizer)` (training: its data). Every applied step is appended to
`model.compression` as a plain dict (`step_record`), saved in the checkpoint's slmkit.json, and can be turned
back into its config (slmkit.steps.step_from_record) to run the same pipeline again on another model. The table
of step kinds lives in slmkit.steps, above the packages that define them: this module imports none of them but
the adapters (base + LoRA adapter gets a recorded merge step before compression).
"""

from __future__ import annotations

import torch

from .errors import require
from .records import step_record  # noqa: F401  (re-exported: the record of a step, as slmkit.json holds it)


def apply_step_(model, cfg, calib: torch.Tensor | None = None) -> None:
    """Apply one step in place and record it on the model."""
    require(calib is not None or not getattr(cfg, "needs_calibration", False), f"{cfg.method} needs calibration tokens")
    cfg.apply_(model, calib)
    model.compression.append(step_record(cfg))


def run_pipeline_(model, tokenizer, steps: list) -> None:
    """Apply the steps in order, each with the inputs it asks for: its own inputs(tokenizer), or calibration
    tokens drawn from its CalibConfig when it needs them."""
    for cfg in steps:
        apply_step_(model, cfg, step_inputs(cfg, tokenizer))


def step_inputs(cfg, tokenizer):
    from .calib import calibration_tokens

    if hasattr(cfg, "inputs"):
        return cfg.inputs(tokenizer)
    return calibration_tokens(tokenizer, cfg.calib) if cfg.needs_calibration else None


def compress(spec, steps: list, out, force: bool = False, sparse_storage: bool = False):
    """Load MODEL, apply the steps in order, save an slmkit checkpoint at `out` (atomically; an existing `out`
    is refused before any work unless force; sparse_storage: zeros stored compressed, see save_checkpoint)."""
    from pathlib import Path

    from .backends import load
    from .checkpoint import save_checkpoint

    require(force or not Path(out).exists(), f"{out} exists; pass --force to replace it")
    lm = load(spec)
    run_pipeline_(lm.model, lm.tokenizer, _plain_first(lm, steps))
    return save_checkpoint(lm.model, lm.tokenizer, Path(out), force=force, sparse_storage=sparse_storage)


def _plain_first(lm, steps: list) -> list:
    """Compression takes a plain model: base + LoRA adapter gets a recorded merge step first (its KL measured);
    a prompt-tuning adapter is refused."""
    from .adapters import lora_modules, refuse_adapted
    from .adapters.merge import merge_step

    if lora_modules(lm.model) and not any(getattr(c, "method", None) == "merge_lora" for c in steps):
        steps = [merge_step(lm.model, lm.source), *steps]
    if not lora_modules(lm.model):
        refuse_adapted(lm.model, "compression")
    return steps
