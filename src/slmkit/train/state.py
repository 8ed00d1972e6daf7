"""Train-state checkpoints: everything a run needs to continue bit for bit, at optimizer-step boundaries.

A checkpoint is a folder `step-NNNNNNNN` under the run's state folder, assembled beside it and renamed into
place only when complete (slmkit.files.atomic_output), so a killed run never leaves one that looks complete:
model.safetensors (every weight), optimizer.safetensors (the optimizer's tensors) and train_state.json (step,
data position, loss curve, the optimizer's scalars and parameter groups, python's RNG, what the run must match
to be resumed). torch's RNG states are uint8 tensors in optimizer.safetensors. Only safetensors and JSON are
read back: nothing is unpickled.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import SlmError, require
from ..files import atomic_output

STATE_MARKER = "train_state.json"
STATE_FORMAT = 1


def step_folder(state_dir: Path, step: int) -> Path:
    return Path(state_dir) / f"step-{step:08d}"


def save_state(state_dir: Path, step: int, model_state: dict, optim_state: dict, meta: dict) -> Path:
    """Write the checkpoint of `step` atomically, then remove older ones (at most one interval is lost)."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    out = step_folder(state_dir, step)
    tensors, scalars = flatten_optimizer(optim_state)
    tensors.update(rng_tensors())
    with atomic_output(out, force=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        record = {"format": STATE_FORMAT, **meta, "optimizer": scalars, "python_rng": _jsonable(random.getstate())}
        (tmp / STATE_MARKER).write_text(json.dumps(record, indent=1))
    for old in Path(state_dir).glob("step-*"):
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return out


def latest_state(state_dir: Path) -> Path | None:
    """The newest complete checkpoint under state_dir (temporary folders of an interrupted save are ignored)."""
    done = sorted(p for p in Path(state_dir).glob("step-*") if (p / STATE_MARKER).is_file())
    return done[-1] if done else None


def load_state(folder: Path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state dict, meta) of a checkpoint; python's RNG is restored by restore_rng."""
    try:
        meta = json.loads((folder / STATE_MARKER).read_text())
        model_state = load_file(str(folder / "model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise SlmError(f"{folder}: corrupt train-state checkpoint ({str(exc).splitlines()[0]})") from None
    require(meta.get("format") == STATE_FORMAT, f"{folder}: train-state format {meta.get('format')!r} is not "
            f"{STATE_FORMAT}")
    meta["rng_tensors"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return model_state, unflatten_optimizer(tensors, meta.pop("optimizer")), meta


# ---- optimizer state as safetensors + JSON ----------------------------------------------------
def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> ({"state|<param>|<key>": tensor}, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state|{param}|{key}"] = value.detach().contiguous()
            else:
                scalars[f"{param}|{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": _jsonable(state_dict["param_groups"])}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], record: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("state|"):
            _, param, key = name.split("|")
            state.setdefault(_param_key(param), {})[key] = value
    for name, value in record["scalars"].items():
        param, key = name.split("|")
        state.setdefault(_param_key(param), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in record["param_groups"]]
    return {"state": state, "param_groups": groups}


def _param_key(text: str):
    """Plain optimizers key parameters by index, distributed full state dicts by name."""
    return int(text) if text.isdigit() else text


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# ---- random number generators -----------------------------------------------------------------
def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(meta: dict) -> None:
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(meta["rng_tensors"]["rng.torch"])
    if "rng.cuda" in meta["rng_tensors"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(meta["rng_tensors"]["rng.cuda"])
