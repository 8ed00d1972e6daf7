"""Adapter folders in PEFT's format, which the Hugging Face ecosystem reads, plus slmkit's note of the base.

A folder holds adapter_config.json and adapter_model.safetensors exactly as PEFT writes them (key names from
slmkit.convert's PEFT tables), and slmkit_adapter.json: the base model it was made for (as given, and its
config), and the history of the run that made it. `load_adapted(FOLDER)` loads the base and puts the adapter
on it; a folder PEFT made (no slmkit_adapter.json) loads the same way, its base taken from
`base_model_name_or_path` or given. Only safetensors and JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import convert
from ..errors import SlmError, require
from ..files import atomic_output
from ..loader import LoadedModel, load
from ..modules import LayerFilter
from .lora import LoRAConfig, apply_lora_, lora_modules
from .prompt import PromptTuningConfig, apply_prompt_tuning_

ADAPTER_MARKER = "slmkit_adapter.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = 1


def is_adapter_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / PEFT_CONFIG).is_file()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors under slmkit names (lora_A / lora_B of every adapted linear, the prompt)."""
    state = {f"{n}.{part}.weight": getattr(m, part).weight.detach() for n, m in lora_modules(model)
             for part in ("lora_A", "lora_B")}
    state.update({f"{n}.lora_magnitude_vector": m.lora_magnitude_vector.detach() for n, m in lora_modules(model)
                  if m.lora_magnitude_vector is not None})
    if getattr(model, "prompt", None) is not None:
        state["prompt"] = model.prompt.detach()
    return state


def save_adapter(model: nn.Module, out: Path, base: str | None, history: list, force: bool = False) -> Path:
    """Write the PEFT-format folder (atomically); `base` names the model it adapts (None: the default model)."""
    state = adapter_state(model)
    require(bool(state), "the model has no adapter to save")
    weights = convert.state_to_peft({k: v.float() for k, v in state.items()}, model.cfg)
    note = {"format": ADAPTER_FORMAT, "base": base, "base_config": model.cfg.to_dict(), "history": history}
    with atomic_output(Path(out), force) as tmp:
        save_file(weights, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config(model, base), indent=2))
        (tmp / ADAPTER_MARKER).write_text(json.dumps(note, indent=2))
    return Path(out)


def peft_config(model: nn.Module, base: str | None) -> dict:
    """adapter_config.json: PEFT's LoraConfig or PromptTuningConfig fields for what the model carries."""
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
              "revision": None, "modules_to_save": None}
    lora = lora_modules(model)
    require(not (lora and model.prompt is not None), "one adapter folder holds LoRA or prompt tuning, not both")
    if not lora:
        return {**common, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": model.n_virtual,
                "token_dim": model.cfg.dim, "num_transformer_submodules": 1, "num_attention_heads": model.cfg.n_heads,
                "num_layers": model.cfg.n_layers, "prompt_tuning_init": "SAMPLE_VOCAB"}
    first = lora[0][1]
    dora = first.lora_magnitude_vector is not None
    same = all((m.rank, m.alpha, m.rslora, m.lora_magnitude_vector is not None) ==
               (first.rank, first.alpha, first.rslora, dora) for _, m in lora)
    require(same, "PEFT's adapter_config holds one rank and alpha; the adapters differ")
    return {**common, "peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha,
            "lora_dropout": first.dropout_p, "use_rslora": first.rslora, "use_dora": dora, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
            "target_modules": _targets(model, [n for n, _ in lora])}


def _targets(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT's target_modules: short names (q_proj, ...) when they select exactly the adapted linears, else
    every adapted module's full transformers name."""
    short = convert.peft_target_names(names, model.cfg)
    every = [n for n, _ in model.named_modules()  # blocks.{i}.attn.q_proj: a block's linears, not their insides
             if n.startswith("blocks.") and n.count(".") == 3 and n.rsplit(".", 1)[-1] in short]
    if sorted(every) == sorted(names):
        return short
    full = convert.state_to_peft({f"{n}.lora_A.weight": torch.empty(0) for n in names}, model.cfg)
    return sorted(k[len(convert.PEFT_PREFIX):-len(".lora_A.weight")] for k in full)


# ---- reading ------------------------------------------------------------------------------------
def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config.json, tensors under PEFT names, slmkit_adapter.json or {}) of an adapter folder."""
    folder = Path(folder)
    config, note = _json(folder / PEFT_CONFIG), _json(folder / ADAPTER_MARKER) if (folder / ADAPTER_MARKER).is_file() else {}
    require(isinstance(config, dict) and isinstance(note, dict), f"{folder}: adapter JSON files must hold objects")
    require((folder / PEFT_WEIGHTS).is_file(), f"{folder}: no {PEFT_WEIGHTS} (only safetensors adapters are read)")
    try:
        tensors = load_file(str(folder / PEFT_WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise SlmError(f"{folder / PEFT_WEIGHTS}: corrupt or truncated ({str(exc).splitlines()[0]})") from None
    return config, tensors, note


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SlmError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None


def load_adapter_(model: nn.Module, folder: Path) -> str:
    """Put the adapter of `folder` on `model` (in place); returns its PEFT type. A base that does not match
    (another config, missing modules, other shapes) is refused with what differs."""
    config, tensors, note = read_adapter(folder)
    if note.get("base_config") is not None:
        _check_base(note["base_config"], model.cfg.to_dict(), folder)
    state = convert.state_from_peft(tensors, model.cfg, str(folder))
    kind = config.get("peft_type")
    if kind == "LORA":
        _put_lora(model, config, state, folder)
    elif kind == "PROMPT_TUNING":
        _put_prompt(model, config, state, folder)
    else:
        raise SlmError(f"{folder}: PEFT type {kind!r} is not supported (LORA, PROMPT_TUNING)")
    return kind


def _check_base(made_for: dict, this: dict, folder: Path) -> None:
    differ = sorted(k for k in set(made_for) | set(this) if made_for.get(k) != this.get(k))
    require(not differ, f"{folder} was made for another base: " + ", ".join(
        f"{k} {made_for.get(k)!r} there, {this.get(k)!r} here" for k in differ[:3]))


def _put_lora(model: nn.Module, config: dict, state: dict[str, torch.Tensor], folder: Path) -> None:
    unsupported = {k: config.get(k) for k in ("fan_in_fan_out", "rank_pattern", "alpha_pattern")
                   if config.get(k)} | ({"bias": config["bias"]} if config.get("bias", "none") != "none" else {})
    require(not unsupported, f"{folder}: LoRA options slmkit does not read: {unsupported}")
    modules = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".weight")})  # blocks.{i}.attn.q_proj
    require(bool(modules), f"{folder}: the adapter holds no LoRA tensors")
    try:
        cfg = LoRAConfig(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0),
                         LayerFilter(tuple(modules)), bool(config.get("use_rslora", False)),
                         bool(config.get("use_dora", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise SlmError(f"{folder}: adapter_config.json: bad or missing LoRA field ({exc})") from None
    apply_lora_(model, cfg)
    _copy_into(model, state, folder)


def _put_prompt(model: nn.Module, config: dict, state: dict[str, torch.Tensor], folder: Path) -> None:
    prompt = state.get("prompt")
    require(prompt is not None and prompt.dim() == 2, f"{folder}: no [n, dim] prompt_embeddings tensor")
    apply_prompt_tuning_(model, PromptTuningConfig(prompt.shape[0]))
    _copy_into(model, state, folder)


def _copy_into(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    own = dict(model.named_parameters())
    for name, tensor in state.items():
        require(name in own, f"{folder}: adapter tensor {name} fits no module of this model")
        require(own[name].shape == tensor.shape, f"{folder}: adapter tensor {name} is {tuple(tensor.shape)}; "
                f"this base needs {tuple(own[name].shape)} (an adapter made for another base?)")
        own[name].data.copy_(tensor.float())


def load_adapted(folder: Path, dtype: torch.dtype = torch.float32, base: str | None = None) -> LoadedModel:
    """The base model (`base`, else the one the folder names) loaded in `dtype`, with the adapter on it."""
    config, _, note = read_adapter(folder)
    spec = base if base is not None else note.get("base", config.get("base_model_name_or_path"))
    lm = load(spec, dtype)
    load_adapter_(lm.model, folder)
    lm.model.compression = list(lm.model.compression) + list(note.get("history", []))
    size = lm.file_bytes + (Path(folder) / PEFT_WEIGHTS).stat().st_size
    return LoadedModel(lm.model, lm.tokenizer, str(folder), "adapter", size)
