"""Reading a recipe: the file, each step into its config, and the order the steps may come in -- all before
any model is loaded, so a bad recipe costs nothing and writes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlmError, require
from ..steps import step_from_record

# Each method's phase; a step may not come after a step of a later phase, except as ALLOWED_AFTER says.
PHASES = {"prune": 0, "prune_structured": 0, "train": 1, "distill": 1, "qat": 2, "awq": 2, "gptq": 2, "rtn": 2,
          "smoothquant": 2, "kv_cache": 3, "export": 4}
KNOWN = tuple(PHASES)
QUANTIZE = ("qat", "awq", "gptq", "rtn", "smoothquant")
DISTILL_FIELDS = ("teachers", "weights", "confidence", "loss", "beta", "skew", "temperature", "kd_ratio", "topk",
                  "cache", "on_policy", "teacher_dtype")


@dataclass
class Export:
    format: str = "gguf"  # gguf | hf
    type: str = "auto"
    out: str | None = None  # default: OUT.gguf / OUT-hf beside the checkpoint


@dataclass
class Recipe:
    steps: list = field(default_factory=list)  # step configs, in order
    export: Export | None = None
    model: str | None = None
    source: str = ""


def read_recipe(path: str | Path, model: str | None = None) -> Recipe:
    """The recipe at `path` with its steps built and their order checked; `model` overrides the file's."""
    data = _load(Path(path))
    require(isinstance(data, dict) and isinstance(data.get("steps"), list) and data["steps"],
            f"{path}: a recipe is a mapping with a non-empty list 'steps'")
    unknown = sorted(set(data) - {"model", "steps", "description"})
    require(not unknown, f"{path}: unknown recipe field(s) {', '.join(unknown)}")
    spec = model if model is not None else data.get("model")
    require(spec is None or isinstance(spec, str), f"{path}: 'model' must be a model name or path")
    methods = [_method(s, i, path) for i, s in enumerate(data["steps"])]
    check_order(methods, path)
    recipe = Recipe(model=spec, source=str(path))
    for i, (raw, method) in enumerate(zip(data["steps"], methods)):
        if method == "export":
            recipe.export = _export(raw, i, path)
        else:
            recipe.steps.append(_step(raw, method, spec, i, path))
    return recipe


def _load(path: Path):
    require(path.is_file(), f"{path}: no such recipe file")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise SlmError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                       f"{str(exc).splitlines()[0]}") from None


def _method(raw, i: int, path) -> str:
    require(isinstance(raw, dict) and isinstance(raw.get("method"), str), f"{path}: step {i + 1} must be a mapping "
            "with a 'method'")
    require(raw["method"] in PHASES, f"{path}: step {i + 1}: unknown step {raw['method']!r}; known: {', '.join(KNOWN)}")
    return raw["method"]


def check_order(methods: list[str], path="recipe") -> None:
    """Refuse an impossible order: shaping or training after the weights are quantized, a second QAT, anything
    after export."""
    for i, (before, after) in enumerate(zip(methods, methods[1:])):
        if PHASES[after] < PHASES[before] and not (before in QUANTIZE and after in QUANTIZE and after != "qat"):
            raise SlmError(f"{path}: step {i + 2} ({after}) cannot come after step {i + 1} ({before}): "
                           f"{_reason(before, after)}")
    require(methods.count("export") <= 1, f"{path}: at most one export step")
    quantized = [i for i, m in enumerate(methods) if m in QUANTIZE]
    require(methods.count("qat") <= 1, f"{path}: at most one qat step")
    if "qat" in methods and quantized:
        require(methods.index("qat") == quantized[-1], f"{path}: qat must be the last quantization step (it packs "
                "what it trains)")


def _reason(before: str, after: str) -> str:
    if before == "export":
        return "export is the last step"
    if before in QUANTIZE or before == "kv_cache":
        return f"{after} needs float weights, and {before} has packed them"
    return "training comes after the model's shape is fixed (prune first)"


def _step(raw: dict, method: str, spec: str | None, i: int, path):
    record = _distill_record(raw, spec) if method == "distill" else _with_input_teacher(raw, spec)
    try:
        cfg = step_from_record(record)
        return cfg.validate() if hasattr(cfg, "validate") else cfg
    except SlmError as exc:
        raise SlmError(f"{path}: step {i + 1} ({method}): {exc}") from None
    except (TypeError, ValueError) as exc:
        raise SlmError(f"{path}: step {i + 1} ({method}): {exc}") from None


def _distill_record(raw: dict, spec: str | None) -> dict:
    """A `distill` step as the `train` record it stands for: its distillation fields become the objective."""
    objective = {"name": "distill", **{k: raw[k] for k in DISTILL_FIELDS if k in raw}}
    objective.setdefault("teachers", ["input"])
    rest = {k: v for k, v in raw.items() if k not in DISTILL_FIELDS and k != "method"}
    train = dict(rest.pop("train", None) or {})
    require(isinstance(train, dict), "a distill step's 'train' must be a mapping of training settings")
    train["objective"] = objective
    return _with_input_teacher({"method": "train", **rest, "train": train}, spec)


def _with_input_teacher(raw: dict, spec: str | None) -> dict:
    """Teacher 'input' (a train or qat step's distillation objective) becomes the recipe's own model."""
    train = raw.get("train")
    objective = train.get("objective") if isinstance(train, dict) else None
    if not isinstance(objective, dict) or not isinstance(objective.get("teachers"), list):
        return raw
    teachers = [spec if t == "input" else t for t in objective["teachers"]]
    return {**raw, "train": {**train, "objective": {**objective, "teachers": teachers}}}


def _export(raw: dict, i: int, path) -> Export:
    fields = {k: v for k, v in raw.items() if k != "method"}
    unknown = sorted(set(fields) - {"format", "type", "out"})
    require(not unknown, f"{path}: step {i + 1} (export): unknown field(s) {', '.join(unknown)}")
    export = Export(**fields)
    require(export.format in ("gguf", "hf"), f"{path}: step {i + 1} (export): format must be gguf or hf, got "
            f"{export.format!r}")
    return export
