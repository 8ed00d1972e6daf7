"""Engines that run a model behind slmkit's one model interface: `torch` (slmkit's own Decoder; every format) and
`llamacpp` (a GGUF file through llama-cpp-python, the engine CPU users deploy with; see llamacpp.py).

Every backend's model offers what the generator and evaluator call -- `cfg` (vocab_size, max_seq_len),
`forward(tokens, cache, pos, last_only)` and `new_cache(batch, max_len)` -- so generate, score, perplexity and
cost run on any of them unchanged. A model that is not a torch Decoder also describes itself for reports:
`backend`, `dtype` (its weight type), `layout` (a meta-device Decoder of its architecture, for parameter counts
and FLOPs), `weight_bytes()`, `decode_bytes_per_token()` and `threads`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import adapters, loader  # noqa: F401  (adapters: registers adapter folders with the loader)
from ..errors import require
from ..info import INFO_SCHEMA, describe, model_info as torch_model_info
from ..loader import LoadedModel
from ..model import Decoder, count_parameters
from . import llamacpp


def _load_torch(spec, dtype: torch.dtype, threads: int | None) -> LoadedModel:
    return loader.load(spec, dtype)  # torch's threads are set process-wide (torch.set_num_threads)


def _load_llamacpp(spec, dtype: torch.dtype, threads: int | None) -> LoadedModel:
    return llamacpp.load_gguf(spec, threads)  # the file's own weight types: dtype does not apply


LOADERS = {"torch": _load_torch, "llamacpp": _load_llamacpp}  # the one table of backends, by name
BACKENDS = tuple(LOADERS)


def load(spec: str | Path | None = None, dtype: torch.dtype = torch.float32, backend: str = "torch",
         threads: int | None = None) -> LoadedModel:
    """Load MODEL (see loader.resolve) on `backend`: torch with weights in `dtype`, or llamacpp (GGUF files
    only, as stored) on `threads` threads (default: torch's thread count)."""
    require(backend in LOADERS, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return LOADERS[backend](spec, dtype, threads)


def backend_of(model) -> str:
    return "torch" if isinstance(model, Decoder) else model.backend


def model_info(lm: LoadedModel) -> dict:
    """info.model_info of a model on any backend, plus "backend". Another engine's model is described by its
    architecture (`layout`: parameter counts, description) and its own weight bytes, weight type and threads;
    its weights are not read (they stay in the engine's own format)."""
    if isinstance(lm.model, Decoder):
        return {**torch_model_info(lm), "backend": "torch"}
    model, cfg = lm.model, lm.model.cfg
    counts, by_dtype = count_parameters(model.layout), model.weight_bytes()
    return {"schema": INFO_SCHEMA, "source": lm.source, "format": lm.kind, "architecture": cfg.family,
            "description": describe(model.layout), "params": counts["total"],
            **{f"params_{part}": n for part, n in counts.items() if part != "total"},
            "weight_bytes": sum(by_dtype.values()), "weight_bytes_by_dtype": by_dtype, "file_bytes": lm.file_bytes,
            "context_length": cfg.max_seq_len, "vocab_size": cfg.vocab_size, "config": cfg.to_dict(),
            "backend": model.backend, "dtype": model.dtype, "threads": model.threads}
