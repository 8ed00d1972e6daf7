"""llama.cpp as a backend: a GGUF file run by llama-cpp-python behind the interface slmkit's generator and
evaluator call (`cfg`, `forward(tokens, cache, pos, last_only)`, `new_cache()`), so that `slm generate`, `slm eval`
and `slm bench` measure the engine CPU users deploy with, on the file as stored (no dequantization).

Token ids come from slmkit's own Tokenizer read from the same file, so both backends see identical ids; llama.cpp
never tokenizes. A llama.cpp context holds one KV cache (sequence 0). `LlamaCppCache` records the tokens a
generation has fed it, and every forward call first makes the context hold exactly that cache's tokens before
`pos`: kept when they are there already, cut back when `pos` rewinds, replayed when another call used the context
in between. A call without a cache starts from an empty KV cache, so a score never depends on what ran before.

llama.cpp's own settings are kept (its CPU kernels, float16 keys and values: what deployments run); only the
threads and the context length (the model's own) are chosen here, and float32 keys and values on request (exact
parity with the torch backend). llama_cpp is imported when a model is loaded, not with this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..convert import config_from_gguf
from ..errors import SlmError, require
from ..gguf_io import GGUF_MAGIC, TensorInfo, _nbytes, read_header
from ..loader import LoadedModel, resolve
from ..model import Decoder
from ..tokenizer import Tokenizer

INSTALL_HINT = "install the llamacpp extra: pip install 'slmkit[llamacpp]'"
N_BATCH = 512  # tokens per llama_decode call at most (llama.cpp's default batch)


@dataclass
class LlamaCppCache:
    """The tokens one sequence has fed llama.cpp, from position 0; their keys and values live in the context."""

    max_len: int
    tokens: list[int] = field(default_factory=list)


class LlamaCppModel:
    """A GGUF model run by llama.cpp with Decoder.forward's contract; batch rows run one after another."""

    backend = "llamacpp"
    device = torch.device("cpu")

    def __init__(self, llm, cfg: ModelConfig, infos: list[TensorInfo], file_bytes: int, threads: int):
        import llama_cpp

        self.llm, self.cfg, self.threads, self.file_bytes = llm, cfg, threads, file_bytes
        self.matrix_bytes = matrix_bytes(infos)
        self._lib = llama_cpp
        self._batch = llama_cpp.llama_batch_init(llm.n_batch, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        weakref.finalize(self, llm.close)  # also at exit, while llama_cpp can still free what it holds
        self._held: LlamaCppCache | None = None  # the cache whose tokens llama.cpp's KV cache holds

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> LlamaCppCache:
        """A cache for one sequence of up to max_len tokens (default and at most: the model's context)."""
        if batch != 1:
            raise ValueError(f"the llama.cpp backend keeps one sequence per cache; batch {batch} asked for")
        return LlamaCppCache(min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len))

    def forward(self, tokens: torch.Tensor, cache: LlamaCppCache | None = None, pos: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions pos..pos+T -> float32 logits [B, T, V] ([B, 1, V] with last_only)."""
        B, T = tokens.shape
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        if cache is not None and (B != 1 or pos + T > cache.max_len):
            raise ValueError(f"a cache holds one sequence of {cache.max_len} tokens; asked for {B} x {pos + T}")
        rows = [self._row(row.tolist(), cache, pos, last_only) for row in tokens]
        return torch.from_numpy(np.stack(rows))

    __call__ = forward

    def _row(self, ids: list[int], cache: LlamaCppCache | None, pos: int, last_only: bool) -> np.ndarray:
        """Logits [T, V] (or [1, V]) of one row, run after what `cache` holds before `pos`."""
        self._sync(cache, pos)
        logits = self._decode(ids, pos, all_logits=not last_only)
        if cache is not None:
            cache.tokens[pos:] = ids
        self._held = cache
        return logits

    def _sync(self, cache: LlamaCppCache | None, pos: int) -> None:
        """Make llama.cpp's KV cache hold exactly `cache`'s tokens before `pos` (nothing without a cache)."""
        if cache is None and pos:
            raise ValueError("without a cache, tokens start at position 0")
        if cache is not None and pos > len(cache.tokens):
            raise ValueError(f"position {pos} is past the {len(cache.tokens)} tokens in the cache")
        keep = pos if cache is not None and cache is self._held else 0
        self._held = None
        self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.llm.ctx), 0, keep, -1)
        if keep < pos:  # another sequence used the context since: replay this one
            self._decode(cache.tokens[keep:pos], keep, all_logits=False)

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Feed ids at positions start.. to llama.cpp, n_batch at a time; logits [len(ids), V] or [1, V] (last)."""
        rows, step = [], self.llm.n_batch
        for i in range(0, len(ids), step):
            chunk = ids[i:i + step]
            self._fill(chunk, start + i, all_logits)
            code = self._lib.llama_decode(self.llm.ctx, self._batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            shape = (len(chunk) if all_logits else 1, self.cfg.vocab_size)
            rows.append(np.ctypeslib.as_array(self._lib.llama_get_logits(self.llm.ctx), shape=shape).copy())
        return np.concatenate(rows) if all_logits else rows[-1]

    def _fill(self, chunk: list[int], start: int, all_logits: bool) -> None:
        """The batch: chunk's tokens at positions start.., sequence 0, logits of every token or of the last."""
        b = self._batch
        b.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, start + i, 1, all_logits
            b.seq_id[i][0] = 0
        b.logits[len(chunk) - 1] = True

    # ---- what reports need: the engine describes itself (see slmkit.backends) ----------------------
    @property
    def dtype(self) -> str:
        """The file's weight type as llama.cpp names it (Q4_1, Q8_0, all F32, ...)."""
        buf = ctypes.create_string_buffer(256)
        self._lib.llama_model_desc(self.llm.model, buf, len(buf))
        return buf.value.decode("utf-8", "replace").split(" ", 2)[-1]

    @cached_property
    def layout(self) -> Decoder:
        """A Decoder of the same architecture on the meta device (no weights): parameter counts and FLOPs."""
        with torch.device("meta"):
            return Decoder(self.cfg)

    def weight_bytes(self) -> dict[str, int]:
        """Weights in memory: llama.cpp maps the whole file, so the file's size, under its weight type."""
        return {f"gguf {self.dtype}": self.file_bytes}

    def decode_bytes_per_token(self) -> int:
        """Bytes of weights a decoded token reads, as stored in the file (see matrix_bytes)."""
        return self.matrix_bytes


def matrix_bytes(infos: list[TensorInfo]) -> int:
    """Stored bytes of every matrix a token's computation reads: every 2-D tensor but the token embedding (a
    one-row lookup), which counts only when it is also the output matrix (tied: no output.weight)."""
    names = {t.name for t in infos}
    tied = "output.weight" not in names
    return sum(_nbytes(t) for t in infos if len(t.shape) == 2 and (t.name != "token_embd.weight" or tied))


def load_gguf(spec: str | Path | None, threads: int | None = None, kv_float32: bool = False) -> LoadedModel:
    """A GGUF file (path, known name; default SmolLM2-135M) on llama.cpp with `threads` threads (default: torch's
    thread count, which the CLI's --threads sets); its tokenizer and config read by slmkit from the same file.
    kv_float32: keys and values in float32 instead of llama.cpp's float16 (exact comparisons with torch)."""
    llama_cpp = _import_llama_cpp()
    path = resolve(None if spec is None else str(spec))
    _check_gguf(path)
    meta, infos, buf = read_header(path)
    buf.close()
    cfg = config_from_gguf(meta, {t.name for t in infos})
    tokenizer = Tokenizer.from_gguf(meta, path)
    threads = threads or torch.get_num_threads()
    kv_type = llama_cpp.GGML_TYPE_F32 if kv_float32 else llama_cpp.GGML_TYPE_F16
    llm = _open(llama_cpp, path, dict(n_ctx=cfg.max_seq_len, n_threads=threads, type_k=kv_type, type_v=kv_type))
    require(llm.n_vocab() == cfg.vocab_size, f"{path}: llama.cpp reads a vocabulary of {llm.n_vocab()} tokens, "
            f"slmkit {cfg.vocab_size}")
    size = path.stat().st_size
    return LoadedModel(LlamaCppModel(llm, cfg, infos, size, threads), tokenizer, str(path), "gguf", size)


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise SlmError(f"the llamacpp backend needs llama-cpp-python: {INSTALL_HINT}") from None
    return llama_cpp


def _check_gguf(path: Path) -> None:
    """A one-line error unless `path` is a GGUF file (checked by its magic bytes, not its name)."""
    require(path.is_file(), f"{path}: the llamacpp backend runs GGUF files; this is a folder")
    with path.open("rb") as f:
        require(f.read(4) == GGUF_MAGIC, f"{path}: the llamacpp backend runs GGUF files; this is not one")


def _open(llama_cpp, path: Path, settings: dict):
    """llama_cpp.Llama on the file (n_ctx, n_threads, type_k, type_v from settings). Its warnings (printed to
    sys.stderr even when not verbose, e.g. a context padded past a tiny model's) are dropped; any failure to
    load becomes one line."""
    n_ctx, threads = settings["n_ctx"], settings["n_threads"]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return llama_cpp.Llama(str(path), **settings, n_batch=min(n_ctx, N_BATCH), n_threads_batch=threads,
                                   verbose=False)
    except Exception as exc:  # llama-cpp-python raises ValueError or RuntimeError, whatever went wrong
        reason = (str(exc).splitlines() or [""])[0]
        raise SlmError(f"{path}: llama.cpp cannot load it ({type(exc).__name__}: {reason})") from None
