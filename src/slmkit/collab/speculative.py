"""Speculative decoding: a cheap drafter proposes k tokens, the target model checks them all in one forward.

Drafters: `DraftModel` (a smaller, pruned or low-bit model with the target's vocabulary, decoding on its own
cache) and `PromptLookup` (the tokens that followed the latest earlier occurrence of the sequence's last n-gram:
"prompt lookup decoding", free on input-grounded tasks such as rewriting or summarising a given text).

`generate.verify` is the acceptance rule, a pure function. Greedy: a drafted token is kept while it is the target's
argmax, and the first mismatch is replaced by that argmax, so the output is the target's own greedy output.
Sampling: the rule of Leviathan et al. / Chen et al. (2023) — keep draft d with probability min(1, p(d) / q(d)),
else draw from max(0, p - q) renormalised, and after k kept drafts draw one more from p — which leaves every
emitted token distributed exactly as the target samples it (q is a point mass for prompt lookup).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..batching.draft import common_prefix
from ..errors import require
from ..generate import GenerationConfig, Timings, distribution, sample, verify


@dataclass
class SpecStats:
    steps: int = 0  # target forwards after the prompt's (each verifies one draft)
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


class Cached:
    """A model and its KV cache holding the tokens `held` (positions 0..len-1)."""

    def __init__(self, model, max_len: int):
        self.model, self.cache, self.held = model, model.new_cache(1, max_len), []

    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Run `tokens` after what is held; their logits [len(tokens), V]."""
        logits = self.model(torch.tensor([tokens]), self.cache, len(self.held))[0]  # [T, V]
        self.held += tokens
        return logits

    def rewind(self, seq: list[int]) -> None:
        """Keep only the longest prefix of what is held that `seq` starts with, short of seq's last token (which
        is fed next, for the logits after it); the rest is overwritten later."""
        del self.held[common_prefix(self.held, seq[:-1]):]


class PromptLookup:
    """Draft the continuation of the latest earlier occurrence of the last n-gram (n = max_ngram .. 1) that is
    followed by k tokens (else the longest continuation found)."""

    stateless = True  # drafts from the tokens alone: one drafter serves every row of a batch

    def __init__(self, max_ngram: int = 3):
        require(1 <= max_ngram <= 64, f"prompt lookup n-gram size must be between 1 and 64, got {max_ngram}")
        self.max_ngram = max_ngram

    def propose(self, seq: list[int], k: int, cfg: GenerationConfig, generator) -> tuple[list[int], None]:
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail, best = seq[-n:], []
            for i in range(len(seq) - n - 1, -1, -1):  # the latest match with a full k-token continuation
                if seq[i:i + n] == tail:
                    best = max(best, seq[i + n:i + n + k], key=len)
                    if len(best) == k:
                        break
            if best:
                return best, None
        return [], None


class DraftModel:
    """A smaller model drafting k tokens autoregressively (sampled as the target would sample, or greedy)."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.state = Cached(model, min(max_len, model.cfg.max_seq_len))

    def propose(self, seq: list[int], k: int, cfg: GenerationConfig, generator) -> tuple[list[int], torch.Tensor | None]:
        s = self.state
        k = min(k, s.cache.max_len - len(seq))
        if k <= 0:
            return [], None
        s.rewind(seq)
        logits = s.feed(seq[len(s.held):])[-1]  # [V]
        tokens, qs = [], []
        for i in range(k):
            if cfg.temperature == 0:
                tokens.append(int(logits.argmax()))
            else:
                qs.append(distribution(logits, cfg))
                tokens.append(int(torch.multinomial(qs[-1], 1, generator=generator)))
            if i < k - 1:
                logits = s.feed(tokens[-1:])[-1]
        return tokens, torch.stack(qs) if qs else None  # q: [k, V]


def make_drafter(target, draft: str | None = None, lookup: int = 0, dtype=None, max_len: int | None = None):
    """The drafter `slm generate` asks for: a draft model loaded from `draft` (its vocabulary checked against
    the target's), or prompt lookup over n-grams up to `lookup`; None when neither is asked."""
    require(not (draft and lookup), "give --draft or --prompt-lookup, not both")
    if lookup:
        return PromptLookup(lookup)
    if not draft:
        return None
    return DraftModel(load_draft(target, draft, dtype).model, max_len or target.model.cfg.max_seq_len)


def load_draft(target, draft: str, dtype=None):
    """The draft model `draft` (LoadedModel), refused unless it shares the target's vocabulary."""
    from ..loader import load
    from ..tokenizer import vocabulary_difference

    lm = load(draft, dtype or torch.float32)
    differ = vocabulary_difference(lm.tokenizer, lm.model.cfg.vocab_size, target.tokenizer,
                                   target.model.cfg.vocab_size, "the target")
    require(differ is None, f"draft {lm.source} {differ}: a draft must share the target's vocabulary")
    lm.model.eval()
    return lm


@torch.inference_mode()
def speculative_generate(model, prompt: list[int], cfg: GenerationConfig, drafter, k: int = 4,
                         timings: Timings | None = None, stats: SpecStats | None = None) -> Iterator[int]:
    """Like generate(): yield new token ids (stop token not yielded), each target forward verifying up to k
    drafted tokens."""
    cfg.validate()
    require(len(prompt) > 0, "the prompt is empty")
    require(1 <= k <= 64, f"draft length must be between 1 and 64, got {k}")
    limit = min(cfg.max_new_tokens, model.cfg.max_seq_len - len(prompt))
    require(limit > 0, f"prompt of {len(prompt)} tokens fills the context of {model.cfg.max_seq_len}")
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    timings, stats = timings if timings is not None else Timings(), stats if stats is not None else SpecStats()
    timings.prompt_tokens = len(prompt)
    target, seq = Cached(model, len(prompt) + limit), list(prompt)
    start = time.perf_counter()
    new = [sample(target.feed(seq)[-1], cfg, generator)]
    timings.prefill_s = time.perf_counter() - start
    while True:
        for token in new:
            timings.new_tokens += 1
            if token in cfg.stop_ids:
                return
            yield token
            seq.append(token)
            if timings.new_tokens >= limit:
                return
        timings.decode_s = time.perf_counter() - start - timings.prefill_s
        target.rewind(seq)
        drafts, q = drafter.propose(seq, min(k, limit - timings.new_tokens - 1), cfg, generator)
        logits = target.feed(seq[len(target.held):] + drafts)[-len(drafts) - 1:]  # [n+1, V]
        kept, nxt = verify(logits, drafts, q, cfg, generator)
        stats.steps, stats.drafted, stats.accepted = stats.steps + 1, stats.drafted + len(drafts), stats.accepted + kept
        new = drafts[:kept] + [nxt]
        timings.decode_s = time.perf_counter() - start - timings.prefill_s
