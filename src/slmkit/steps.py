"""The table of pipeline step kinds, filled from above: every package that defines steps (quantization,
pruning, training) is imported here, and none of them, nor slmkit.pipeline, imports this module. Records in a
checkpoint's history are read back through this one table."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import SlmError, require


def methods() -> dict[str, type]:
    """Every step kind by its recorded name."""
    from . import distill  # noqa: F401  (registers the "distill" objective that training records may name)

    from .adapters import LoRAConfig, PromptTuningConfig
    from .adapters.merge import MergeStep
    from .prune import PruneConfig, StructuredPruneConfig
    from .qat import QATStep
    from .quant import AWQConfig, GPTQConfig, KVCacheConfig, RTNConfig, SmoothQuantConfig
    from .train.step import TrainStep

    return {c.method: c for c in (RTNConfig, GPTQConfig, AWQConfig, SmoothQuantConfig, KVCacheConfig, PruneConfig,
                                  StructuredPruneConfig, TrainStep, LoRAConfig, PromptTuningConfig, MergeStep, QATStep)}


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


def step_from_record(record: dict[str, Any]):
    """The config a record (slmkit.pipeline.step_record) was made from: nested configs rebuilt, tuples restored
    from JSON lists."""
    table = methods()
    require(isinstance(record, dict) and record.get("method") in table,
            f"unknown pipeline step {record.get('method') if isinstance(record, dict) else record!r}; "
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
    """A JSON value converted to the field's annotated type: a config that reads itself (from_dict), a
    dataclass, an optional one, or a tuple."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if isinstance(value, dict) and isinstance(option, type) and hasattr(option, "from_dict"):
            return option.from_dict(value)
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return _build(option, value)
        if typing.get_origin(option) is tuple and isinstance(value, list):
            item = (typing.get_args(option) or (None,))[0]
            return tuple(_build(item, v) if dataclasses.is_dataclass(item) and isinstance(v, dict) else v
                         for v in value)
    return value
