"""llama.cpp with several sequences in one context: what the continuous-batching engine (slmkit.batching)
needs from a model, so that `slm serve --backend llamacpp` batches requests the way slmkit's own runtime does.

One llama.cpp context holds `rows` sequences (sequence id = cache row), each in its own KV stream
(kv_unified off: a sequence's cells lie as they would alone, so its logits are bit for bit those of the
one-sequence backend, tested; a unified cache interleaves the sequences' cells and changes the rounding of
attention's sums). A forward of
tokens [B, T] at per-row positions puts all B x T tokens in one `llama_batch` — each token tagged with its
row's sequence id and position — and runs one `llama_decode`: the weights are read once for the whole batch,
as in llama.cpp's own server. Before writing, each row's cells at and past its start position are removed
(`llama_memory_seq_rm`), so a rewind (speculative drafts not kept, padding) never leaves stale keys behind.
Moving a row (the engine keeps live rows first) copies its cells to the other sequence id
(`llama_memory_seq_cp`).
"""

from __future__ import annotations

import contextlib
import io
import weakref

import numpy as np
import torch

from ..errors import SlmError, require


class SlotCache:
    """Rows start..start+n of the context's sequences (row i is llama.cpp sequence id start + i)."""

    def __init__(self, model: "LlamaCppBatch", start: int, n: int, max_len: int):
        self.model, self.start, self.n, self.max_len = model, start, n, max_len

    def rows(self, start: int, stop: int) -> "SlotCache":
        return SlotCache(self.model, self.start + start, stop - start, self.max_len)

    def move_row(self, src: int, dst: int) -> None:
        lib, mem = self.model.lib, self.model.memory
        lib.llama_memory_seq_rm(mem, self.start + dst, -1, -1)
        lib.llama_memory_seq_cp(mem, self.start + src, self.start + dst, -1, -1)
        lib.llama_memory_seq_rm(mem, self.start + src, -1, -1)


class LlamaCppBatch:
    """The engine's model over a llama.cpp context of `rows` sequences of up to `context` tokens each."""

    backend = "llamacpp"
    n_virtual = 0

    def __init__(self, loaded_llm, cfg, rows: int, context: int, threads: int):
        import llama_cpp

        self.lib, self.cfg, self.rows, self.context = llama_cpp, cfg, rows, context
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = rows * context, rows, False
        params.n_batch = params.n_ubatch = min(rows * context, 2048)
        params.n_threads = params.n_threads_batch = threads
        single = loaded_llm.context_params  # the one-sequence backend's settings: the same arithmetic
        params.flash_attn_type, params.type_k, params.type_v = single.flash_attn_type, single.type_k, single.type_v
        with contextlib.redirect_stderr(io.StringIO()):
            self.ctx = llama_cpp.llama_init_from_model(loaded_llm.model, params)
        require(self.ctx is not None, f"llama.cpp could not make a context of {rows} x {context} tokens")
        self.llm = loaded_llm  # keeps the model alive while the context lives
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = params.n_batch
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self.batch)
        weakref.finalize(self, llama_cpp.llama_free, self.ctx)

    def new_cache(self, batch: int, max_len: int | None = None) -> SlotCache:
        require(batch <= self.rows, f"this llama.cpp context holds {self.rows} sequences; {batch} asked for")
        return SlotCache(self, 0, batch, min(max_len or self.context, self.context))

    def __call__(self, tokens: torch.Tensor, cache: SlotCache, pos, last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions pos (an int, or per-row LongTensor [B]) -> float32 logits [B, T, V]
        ([B, 1, V] with last_only)."""
        B, T = tokens.shape
        starts = pos.tolist() if torch.is_tensor(pos) else [pos] * B
        require(max(starts) + T <= cache.max_len, f"a sequence of {max(starts) + T} tokens exceeds the context "
                f"of {cache.max_len}")
        for b, start in enumerate(starts):
            self.lib.llama_memory_seq_rm(self.memory, cache.start + b, start, -1)
        ids = tokens.tolist()
        items = [(cache.start + b, starts[b] + t, ids[b][t], not last_only or t == T - 1)
                 for b in range(B) for t in range(T)]  # (sequence, position, token, wants logits)
        out = []
        for i in range(0, len(items), self.n_batch):
            out.append(self._decode(items[i:i + self.n_batch]))
        logits = np.concatenate(out)  # [B * (T or 1), V]
        return torch.from_numpy(logits).view(B, 1 if last_only else T, -1)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> np.ndarray:
        b = self.batch
        b.n_tokens = len(items)
        for i, (seq, p, token, wants) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, p, 1, wants
            b.seq_id[i][0] = seq
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise SlmError(f"llama_decode returned {code} (the context of {self.rows} x {self.context} tokens is "
                           f"full or the batch is malformed)")
        V = self.cfg.vocab_size
        rows = [np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(V,)).copy()
                for i, item in enumerate(items) if item[3]]
        return np.stack(rows) if rows else np.zeros((0, V), np.float32)


def load_batch(spec, rows: int, context: int, threads: int | None = None):
    """A GGUF file (path or known name) as a LoadedModel whose model is a LlamaCppBatch of `rows` sequences."""
    from .llamacpp import load_gguf

    loaded = load_gguf(spec, threads)
    single = loaded.model
    context = min(context, single.cfg.max_seq_len)
    loaded.model = LlamaCppBatch(single.llm, single.cfg, rows, context, single.threads)
    loaded.model._single = single  # the Llama object (and its model) stays alive with the batch context
    return loaded
