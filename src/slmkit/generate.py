"""Token generation with a preallocated KV cache: greedy, temperature, top-k, top-p, stop tokens, streaming."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import require
from .model import Decoder


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_ids: set[int] = field(default_factory=set)
    seed: int | None = None

    def validate(self) -> "GenerationConfig":
        require(self.max_new_tokens > 0, f"max_new_tokens must be positive, got {self.max_new_tokens}")
        require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class Timings:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # prompt processed and first token chosen (time to first token)
    decode_s: float = 0.0  # every later token

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """One token id from logits [V] under the configured temperature, top-k and top-p."""
    if cfg.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(distribution(logits, cfg), 1, generator=generator))


def distribution(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """The probabilities [..., V] that sampling draws from: logits / temperature, then top-k and top-p (the
    smallest prefix of the sorted tokens reaching top_p) kept, the rest zero. temperature > 0."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def verify(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, cfg: GenerationConfig,
           generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative decoding's acceptance rule (see slmkit.collab.speculative): the target's logits [n+1, V] at
    the positions before each of the n drafts and after the last; the drafter's probabilities q [n, V] (None:
    each draft was certain). Returns (drafts kept, the next token)."""
    if cfg.temperature == 0:
        best = logits.argmax(-1).tolist()
        for i, d in enumerate(drafts):
            if best[i] != d:
                return i, best[i]
        return len(drafts), best[len(drafts)]
    p = distribution(logits, cfg)  # [n+1, V]
    for i, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[i, d])
        if float(torch.rand((), generator=generator)) * q_d < float(p[i, d]):  # u < p / q without dividing
            continue
        residual = p[i].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q: nothing to correct towards (the draft was rejected by u)
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


@torch.inference_mode()
def generate(model: Decoder, prompt: list[int], cfg: GenerationConfig, timings: Timings | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (streaming); stops at a stop token (not yielded) or max_new_tokens."""
    cfg.validate()
    require(len(prompt) > 0, "the prompt is empty")
    limit = min(cfg.max_new_tokens, model.cfg.max_seq_len - len(prompt))
    require(limit > 0, f"prompt of {len(prompt)} tokens fills the context of {model.cfg.max_seq_len}")
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    timings = timings if timings is not None else Timings()
    timings.prompt_tokens = len(prompt)
    cache = model.new_cache(1, len(prompt) + limit)
    start = time.perf_counter()
    logits = model(torch.tensor([prompt]), cache, 0, last_only=True)[0, -1]  # [V]
    for pos in range(len(prompt), len(prompt) + limit):
        token = sample(logits, cfg, generator)
        now = time.perf_counter()
        if timings.new_tokens == 0:
            timings.prefill_s, start = now - start, now
        else:
            timings.decode_s = now - start
        timings.new_tokens += 1
        if token in cfg.stop_ids:
            return
        yield token
        if timings.new_tokens < limit:
            logits = model(torch.tensor([[token]]), cache, pos)[0, -1]  # [V]


class TextStream:
    """Incremental detokenisation: text appears once its bytes form complete characters."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new
