"""A draft model inside the continuous batch: its own KV cache with one row per engine row, drafting k tokens
for every live sequence in k batched forwards.

Row r of the draft cache holds the tokens `held[r]` of engine row r's sequence (a prefix of its history). A
step first brings every row up to its whole history but the last token (rows one token behind — the usual
case — in one batched forward; a row further behind, e.g. a new request's prompt, alone), then runs k steps
of [n, 1] tokens at per-row positions, greedy or sampled as the request samples (q kept for the rejection
rule). Rows move with the engine's rows (`move_row`).
"""

from __future__ import annotations

import torch

from ..generate import distribution


class BatchDraftModel:
    batched = True  # the engine calls propose_batch once per step instead of propose per row

    def __init__(self, model, rows: int, context: int):
        self.model, self.context = model, min(context, model.cfg.max_seq_len - model.n_virtual)
        self.cache = model.new_cache(rows, self.context)
        self.held: list[list[int]] = [[] for _ in range(rows)]

    def move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)
        self.held[dst], self.held[src] = self.held[src], []

    @torch.inference_mode()
    def propose_batch(self, seqs: list, ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Drafts (and their probabilities q [k, V], None when greedy) for each live row: seqs[r] is engine row
        r (its .history, .request.gen, .generator), ks[r] the tokens it may draft (0: none)."""
        n = len(seqs)
        room = min(self.context - len(s.history) for s in seqs)  # every row feeds k tokens: all must fit
        k = min(max(ks), room)
        if k <= 0:
            return [([], None) for _ in seqs]
        logits = self._catch_up(seqs)  # [n, V]: the draft's prediction after each row's last token
        drafts, qs = [[] for _ in range(n)], [[] for _ in range(n)]
        for step in range(k):
            tokens = []
            for r, s in enumerate(seqs):
                gen = s.request.gen
                if gen.temperature == 0:
                    t = int(logits[r].argmax())
                else:
                    q = distribution(logits[r], gen)
                    qs[r].append(q)
                    t = int(torch.multinomial(q, 1, generator=s.generator))
                drafts[r].append(t)
                tokens.append(t)
            if step < k - 1:
                logits = self._feed_one(tokens)
        out = []
        for r, s in enumerate(seqs):
            d = drafts[r][:min(ks[r], k)]
            q = torch.stack(qs[r][:len(d)]) if qs[r] and d else None
            out.append((d, q))
        return out

    def _catch_up(self, seqs: list) -> torch.Tensor:
        """Make row r hold seq r's history but its last token, then feed the last ones together: logits [n, V]."""
        for r, s in enumerate(seqs):
            h, held = s.history, self.held[r]
            keep = common_prefix(held, h[:-1])
            del held[keep:]
            if len(held) < len(h) - 1:  # far behind (a new prompt, or many kept tokens): this row alone
                part = h[len(held):-1]
                self.model(torch.tensor([part]), self.cache.rows(r, r + 1), len(held), last_only=True)
                held.extend(part)
        return self._feed_one([s.history[-1] for s in seqs])

    def _feed_one(self, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        positions = [len(self.held[r]) for r in range(n)]
        pos = positions[0] if len(set(positions)) == 1 else torch.tensor(positions)
        logits = self.model(torch.tensor(tokens)[:, None], self.cache, pos)[:, -1]  # [n, V]
        for r, t in enumerate(tokens):
            self.held[r].append(t)
        return logits


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
