"""A compression pipeline is data: an ordered list of step configs. Running it is a loop.

Each step config is a dataclass with a `method` name, `needs_calibration`, a `calib` CalibConfig and
`apply_(model, calib_tokens)`. Every applied step is appended to `model.compression` as a plain dict
(`step_record`), saved in the checkpoint's slmkit.json, and can be turned back into its config
(`step_from_record`) to run the same pipeline again on another model.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

import torch

from .errors import SlmError, require


def methods() -> dict[str, type]:
    """Every step kind by its recorded name: the one table records are read back through."""
    from .prune import PruneConfig, StructuredPruneConfig
    from .quant import AWQConfig, GPTQConfig, KVCacheConfig, RTNConfig, SmoothQuantConfig

    return {c.method: c for c in (RTNConfig, GPTQConfig, AWQConfig, SmoothQuantConfig, KVCacheConfig, PruneConfig,
                                  StructuredPruneConfig)}


def apply_step_(model, cfg, calib: torch.Tensor | None = None) -> None:
    """Apply one step in place and record it on the model."""
    require(calib is not None or not cfg.needs_calibration, f"{cfg.method} needs calibration tokens")
    cfg.apply_(model, calib)
    model.compression.append(step_record(cfg))


def run_pipeline_(model, tokenizer, steps: list) -> None:
    """Apply the steps in order, each with calibration tokens drawn from its own CalibConfig when it needs them."""
    from .calib import calibration_tokens

    for cfg in steps:
        apply_step_(model, cfg, calibration_tokens(tokenizer, cfg.calib) if cfg.needs_calibration else None)


def make_step(method: str, **values):
    """A step config by method name from already-typed field values (what a CLI collects); values left None
    keep the config's defaults, and a value the method has no field for is refused."""
    table = methods()
    require(method in table, f"unknown method {method!r}; known: {', '.join(table)}")
    names = {f.name for f in dataclasses.fields(table[method])}
    given = {k: v for k, v in values.items() if v is not None}
    extra = sorted(set(given) - names)
    require(not extra, f"{method} has no option {', '.join(extra)}")
    return table[method](**given)


def compress(spec, steps: list, out, force: bool = False, sparse_storage: bool = False):
    """Load MODEL, apply the steps in order, save an slmkit checkpoint at `out` (atomically; an existing `out`
    is refused before any work unless force; sparse_storage: zeros stored compressed, see save_checkpoint)."""
    from pathlib import Path

    from .checkpoint import save_checkpoint
    from .loader import load

    require(force or not Path(out).exists(), f"{out} exists; pass --force to replace it")
    lm = load(spec)
    run_pipeline_(lm.model, lm.tokenizer, steps)
    return save_checkpoint(lm.model, lm.tokenizer, Path(out), force=force, sparse_storage=sparse_storage)


def step_record(cfg) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), exactly as slmkit.json will hold it."""
    return json.loads(json.dumps({"method": cfg.method, **dataclasses.asdict(cfg)}))


def step_from_record(record: dict[str, Any]):
    """The config a record was made from (nested dataclasses rebuilt; tuples restored from JSON lists)."""
    table = methods()
    require(record.get("method") in table, f"unknown compression step {record.get('method')!r}; "
            f"known: {', '.join(table)}")
    return _build(table[record["method"]], {k: v for k, v in record.items() if k != "method"})


def _build(cls: type, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise SlmError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    return cls(**{k: _value(hints[k], v) for k, v in values.items()})


def _value(hint, value):
    """A JSON value converted to the field's annotated type (dataclass, optional dataclass or tuple)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return _build(option, value)
        if typing.get_origin(option) is tuple and isinstance(value, list):
            return tuple(value)
    return value
