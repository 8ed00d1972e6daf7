"""Continuous batching over slmkit's own runtime.

The engine owns one KV cache of `max_active` rows. A live sequence occupies a row (rows 0..n-1 are the n live
ones); a request joins at a token boundary (its prompt prefilled alone into the next free row) and leaves at
one (its row refilled by the last live row). Every step then decodes one token for all live sequences in one
forward: the batch's linears read each weight once per step, each row at its own position
(`Decoder.forward(tokens, cache, pos=LongTensor[n])`). Greedy output of a request equals `generate()` on it
alone (tests/test_serve.py).

Requests wait in a bounded queue; past it `submit` raises `Busy` at once. The engine is driven by `step()`
(tests call it directly, for exact interleavings) or by `start()`, a thread looping over it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SlmError, require
from ..generate import GenerationConfig, TextStream, sample, verify
from .text import StopText


class Busy(SlmError):
    """Every row is live and the queue is full: try again later."""


@dataclass
class Event:
    """What the engine tells a request's sink: a piece of text, then one final event (`done`)."""
    text: str = ""
    token: int | None = None  # the token this event's text came from (its text may be held back: "")
    logprob: float | None = None  # the model's log-probability of that token (before temperature)
    done: bool = False
    finish_reason: str | None = None  # "stop" (a stop token or string), "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # arrival to first token
    tpot_s: float | None = None  # mean time per output token after the first
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    gen: GenerationConfig
    stops: tuple[str, ...] = ()


@dataclass
class _Seq:
    request: Request
    sink: Callable[[Event], None]
    stream: TextStream
    stop: StopText
    limit: int  # new tokens allowed (max_tokens capped by the context)
    generator: torch.Generator | None
    arrived: float = field(default_factory=time.perf_counter)
    history: list[int] = field(default_factory=list)  # prompt and generated tokens (what a drafter reads)
    pos: int = 0  # where the next token goes
    token: int = -1  # the last sampled token, fed at the next step
    new: int = 0  # tokens generated
    first: float | None = None
    last: float | None = None
    cancelled: bool = False


class Handle:
    """What `submit` returns: `cancel()` frees the request's row (or queue place) at the next token boundary."""

    def __init__(self, seq: _Seq, engine: "Engine"):
        self._seq, self._engine = seq, engine

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine.notify()


class Engine:
    def __init__(self, model, tokenizer, max_active: int = 8, max_queue: int = 64, context: int | None = None,
                 drafter=None, draft_tokens: int = 4):
        """drafter: speculative decoding inside the batch — an object whose propose(tokens, k, gen, generator)
        drafts up to k tokens from a sequence's tokens alone (prompt lookup: slmkit.collab.PromptLookup); each
        step then verifies every row's drafts in the same forward."""
        require(max_active >= 1, f"max_active must be >= 1, got {max_active}")
        require(max_queue >= 0, f"max_queue must be >= 0, got {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.context = min(context or model.cfg.max_seq_len, model.cfg.max_seq_len - model.n_virtual)
        require(self.context >= 2, f"context must be >= 2 tokens, got {self.context}")
        self.max_active, self.max_queue = max_active, max_queue
        require(drafter is None or getattr(drafter, "stateless", False) or getattr(drafter, "batched", False),
                "the batch engine drafts with prompt lookup or a BatchDraftModel (one draft cache row per row)")
        require(1 <= draft_tokens <= 64, f"draft_tokens must be between 1 and 64, got {draft_tokens}")
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.drafted = self.accepted = 0  # speculative decoding's totals
        self.cache = model.new_cache(max_active, self.context)  # [max_active rows, ..., context, ...]
        self.active: list[_Seq] = []  # active[i] lives in cache row i
        self.waiting: deque[_Seq] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False

    # ---- the request side (any thread) -----------------------------------------------------------
    def submit(self, request: Request, sink: Callable[[Event], None]) -> Handle:
        """Queue a request; its events go to `sink` from the engine's thread. Raises SlmError for a prompt the
        context cannot hold and Busy when the queue is full."""
        n = len(request.prompt)
        require(n > 0, "the prompt is empty")
        require(n < self.context, f"the prompt has {n} tokens; the context holds {self.context} "
                f"(prompt and completion together)")
        request.gen.validate()
        gen = request.gen
        seq = _Seq(request, sink, TextStream(self.tokenizer), StopText(request.stops),
                   min(gen.max_new_tokens, self.context - n),
                   torch.Generator().manual_seed(gen.seed) if gen.seed is not None else None)
        with self._cond:
            if len(self.active) + len(self.waiting) >= self.max_active + self.max_queue:  # rows + queue places
                raise Busy(f"{len(self.active)} sequences live and {len(self.waiting)} waiting: the server is full")
            self.waiting.append(seq)
            self._cond.notify()
        return Handle(seq, self)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def n_active(self) -> int:
        return len(self.active)

    # ---- the engine side (one thread) --------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Retire cancelled sequences, admit waiting ones into free rows (prefill), decode one token for every
        live row. Returns False when there was nothing to do."""
        self._retire_cancelled()
        admitted = self._admit()
        if not self.active:
            return admitted
        self._decode()
        return True

    def _admit(self) -> bool:
        admitted = False
        while len(self.active) < self.max_active:
            with self._cond:
                if not self.waiting:
                    break
                seq = self.waiting.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            self._prefill(seq)
            admitted = True
        return admitted

    def _prefill(self, seq: _Seq) -> None:
        row, prompt = len(self.active), seq.request.prompt
        try:
            tokens = torch.tensor([prompt])  # [1, T]
            logits = self.model(tokens, self.cache.rows(row, row + 1), 0, last_only=True)[0, -1]  # [V]
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            self._finish(seq, "error", error=f"prefill failed: {e}")
            return
        seq.pos, seq.history = len(prompt), list(prompt)
        self.active.append(seq)
        if not self._emit(seq, logits):
            self._retire(row)

    def _decode(self) -> None:
        drafts, qs = self._drafts()
        width = 1 + max(map(len, drafts))  # rows with fewer drafts are padded; their extra outputs are unused
        tokens = torch.tensor([[s.token] + d + [s.token] * (width - 1 - len(d))
                               for s, d in zip(self.active, drafts)])  # [n, width]
        positions = [s.pos for s in self.active]
        # rows at one position take the plain path (no mask): a lone sequence runs exactly as generate() does
        pos = positions[0] if len(set(positions)) == 1 else torch.tensor(positions)  # int or [n]
        try:
            logits = self.model(tokens, self.cache, pos)  # [n, width, V]
        except Exception as e:  # noqa: BLE001
            for seq in self.active:
                self._finish(seq, "error", error=f"decode failed: {e}")
            self.active.clear()
            return
        live = [self._advance(s, logits[i], d, q) for i, (s, d, q) in enumerate(zip(self.active, drafts, qs))]
        for row in reversed(range(len(live))):
            if not live[row]:
                self._retire(row)

    def _drafts(self) -> tuple[list[list[int]], list]:
        """Each live row's drafts and their probabilities (None: certain, or no drafter)."""
        ks = [min(self.draft_tokens, s.limit - s.new - 1, self.context - s.pos - 1) for s in self.active]
        n = len(self.active)
        if self.drafter is None or max(ks) <= 0:
            return [[] for _ in range(n)], [None] * n
        if getattr(self.drafter, "batched", False):
            proposals = self.drafter.propose_batch(self.active, [max(k, 0) for k in ks])
        else:
            proposals = [self.drafter.propose(s.history, k, s.request.gen, s.generator) if k > 0 else ([], None)
                         for s, k in zip(self.active, ks)]
        return [d[:max(k, 0)] for (d, _), k in zip(proposals, ks)], [q for _, q in proposals]

    def _advance(self, seq: _Seq, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None = None) -> bool:
        """After a forward over [token, drafts...] (logits [width, V]): emit the kept drafts and the next token;
        False once the sequence has finished."""
        seq.pos += 1
        if not drafts:
            return self._emit(seq, logits[0])
        kept, nxt = verify(logits[:len(drafts) + 1], drafts, q, seq.request.gen, seq.generator)
        self.drafted, self.accepted = self.drafted + len(drafts), self.accepted + kept
        for j, token in enumerate(drafts[:kept] + [nxt]):
            if not self._accept(seq, token, logits[j]):
                return False
            seq.pos += j < kept  # every kept draft is in the cache now; the next token is fed next step
        return True

    def _emit(self, seq: _Seq, logits: torch.Tensor) -> bool:
        """Sample the sequence's next token from logits [V] and send it; False once the sequence has finished."""
        return self._accept(seq, sample(logits, seq.request.gen, seq.generator), logits)

    def _accept(self, seq: _Seq, token: int, logits: torch.Tensor) -> bool:
        now = time.perf_counter()
        seq.first = seq.first or now
        if token in seq.request.gen.stop_ids:
            return self._finish(seq, "stop")
        seq.token, seq.new, seq.last = token, seq.new + 1, now
        seq.history.append(token)
        logprob = float(torch.log_softmax(logits.float(), -1)[token])
        seq.sink(Event(text=seq.stop.push(seq.stream.push(token)), token=token, logprob=logprob))
        if seq.stop.stopped:
            return self._finish(seq, "stop")
        if seq.new >= seq.limit:
            return self._finish(seq, "length")
        return True

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> bool:
        rest = seq.stop.flush()
        tpot = (seq.last - seq.first) / (seq.new - 1) if seq.new > 1 and seq.first else None
        seq.sink(Event(text=rest, done=True, finish_reason=reason, prompt_tokens=len(seq.request.prompt),
                       completion_tokens=seq.new, ttft_s=None if seq.first is None else seq.first - seq.arrived,
                       tpot_s=tpot, error=error))
        return False

    def _retire(self, row: int) -> None:
        """Free cache row `row`: the last live row moves into it, so live rows stay 0..n-1."""
        last = len(self.active) - 1
        if row != last:
            self.cache.move_row(last, row)
            if getattr(self.drafter, "batched", False):
                self.drafter.move_row(last, row)
            self.active[row] = self.active[last]
        self.active.pop()

    def _retire_cancelled(self) -> None:
        for row in reversed(range(len(self.active))):
            if self.active[row].cancelled:
                self._finish(self.active[row], "cancelled")
                self._retire(row)

    # ---- the thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine on a daemon thread until stop()."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="slmkit-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._running:
            if not self.step():
                with self._cond:
                    if self._running and not self.waiting and not self.active:
                        self._cond.wait(timeout=0.5)

    def stop(self) -> None:
        """Stop the thread; requests still live or waiting end with finish_reason "cancelled"."""
        self._running = False
        self.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for seq in list(self.active) + list(self.waiting):
            self._finish(seq, "cancelled")
        self.active.clear()
        self.waiting.clear()
