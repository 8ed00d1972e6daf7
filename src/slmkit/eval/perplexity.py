"""Perplexity with an explicit, recorded protocol: windows, stride, BOS handling, tokens scored."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import require
from .data import Text
from .scoring import score


@dataclass
class PerplexityProtocol:
    window: int = 512  # tokens per window, BOS included when add_bos
    stride: int | None = None  # None: non-overlapping windows; else windows start every `stride` tokens
    max_windows: int | None = None  # evaluate only the first windows
    add_bos: bool = False  # prepend BOS to every window (then its first real token is scored too)

    def validate(self) -> "PerplexityProtocol":
        require(self.window >= 2, f"window must be at least 2 tokens, got {self.window}")
        require(self.stride is None or 0 < self.stride <= self.window, "stride must be in 1..window")
        require(self.max_windows is None or self.max_windows > 0, f"max_windows must be positive, got {self.max_windows}")
        return self

    @property
    def name(self) -> str:
        return "non-overlapping windows" if self.stride is None else f"sliding windows, stride {self.stride}"


def plan_windows(n_tokens: int, p: PerplexityProtocol) -> list[tuple[int, int, int]]:
    """(start, end, first scored offset) of each window over n_tokens ids.

    Without BOS a window's first token is context only (it has nothing to be predicted from), so
    non-overlapping windows leave each window's first token unscored, as the shared reference protocol does.
    Sliding windows score only the tokens past the previous window, each with up to window-1 tokens of context."""
    span = p.window - int(p.add_bos)
    step = p.stride or span
    min_first = 0 if p.add_bos else 1
    windows, scored_to = [], 0
    for start in range(0, n_tokens, step):
        end = min(start + span, n_tokens)
        first = max(scored_to - start, min_first)
        if end - start > first:
            windows.append((start, end, first))
            scored_to = end
        if end == n_tokens or (p.max_windows and len(windows) == p.max_windows):
            break
    return windows


def window_sequences(tokenizer, text: Text, protocol: PerplexityProtocol) -> tuple[list[int], list, list, list]:
    """(ids of the whole text, windows, token sequences fed to the model, first scored position of each)."""
    protocol.validate()
    require(not protocol.add_bos or tokenizer.bos_token_id is not None, "add_bos: the tokenizer has no BOS token")
    ids = tokenizer.encode(text.text, add_bos=False)
    require(len(ids) >= 2, f"{text.source}: fewer than 2 tokens")
    windows = plan_windows(len(ids), protocol)
    bos = [tokenizer.bos_token_id] if protocol.add_bos else []
    return ids, windows, [bos + ids[s:e] for s, e, _ in windows], [f + len(bos) for _, _, f in windows]


def protocol_record(protocol: PerplexityProtocol, text: Text) -> dict:
    return {**dataclasses.asdict(protocol), "kind": protocol.name, "source": text.source,
            "normalization": text.normalization, "tokenizer": "the model's own, no special tokens",
            "log_softmax": "float64, full vocabulary"}


def perplexity(model, tokenizer, text: Text, protocol: PerplexityProtocol, batch_size: int = 1) -> dict:
    """PPL, mean NLL, bits per byte and token counts of `text` under the protocol (recorded in the result)."""
    require(protocol.window <= model.cfg.max_seq_len,
            f"window {protocol.window} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    ids, windows, sequences, firsts = window_sequences(tokenizer, text, protocol)
    scored = score(model, sequences, batch_size, first=firsts, description="perplexity")
    nll = -sum(float(s.logprobs.sum()) for s in scored)
    n = sum(len(s.logprobs) for s in scored)
    n_bytes = sum(len(tokenizer.decode(ids[s + f:e]).encode("utf-8")) for s, e, f in windows)
    return {"perplexity": math.exp(nll / n), "mean_nll": nll / n, "bits_per_byte": nll / math.log(2) / n_bytes,
            "tokens_scored": n, "bytes_scored": n_bytes, "windows": len(windows), "tokens_in_text": len(ids),
            "top1_accuracy": sum(int(s.greedy.sum()) for s in scored) / n, "protocol": protocol_record(protocol, text)}
