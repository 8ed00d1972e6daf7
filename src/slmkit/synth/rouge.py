"""ROUGE-L (longest common subsequence of words) as Self-Instruct uses it to drop near-duplicate instructions.

Tokens are those of the `rouge-score` package without stemming (its default): the text lowercased, every run of
characters other than a-z / 0-9 a separator. The F-measure is symmetric, so the order of the two texts does not
matter. Pure Python, no dependency; `tests/test_synth.py` checks it against hand-computed values and, where
`rouge-score` is installed, against that package.
"""

from __future__ import annotations

import re

_SEPARATORS = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercased a-z / 0-9 words of `text` (rouge-score's tokenizer, no stemmer)."""
    return [t for t in _SEPARATORS.split(text.lower()) if t]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def f_measure(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists: 2 P R / (P + R) with P = LCS / |a|, R = LCS / |b|; 0 if either is empty."""
    lcs = lcs_length(a, b) if a and b else 0
    return 2 * lcs / (len(a) + len(b)) if lcs else 0.0


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts, in [0, 1]."""
    return f_measure(tokenize(a), tokenize(b))


class Deduper:
    """The instructions kept so far; a new one is similar when its ROUGE-L F against any of them reaches
    `threshold` (Self-Instruct: 0.7)."""

    def __init__(self, threshold: float = 0.7, texts: tuple[str, ...] | list[str] = ()):
        self.threshold, self.kept = threshold, []
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self.kept.append(tokenize(text))

    def most_similar(self, text: str) -> float:
        """The highest ROUGE-L F of `text` against the kept instructions (0 when none is kept)."""
        tokens, best = tokenize(text), 0.0
        for other in self.kept:
            if 2 * min(len(tokens), len(other)) / max(1, len(tokens) + len(other)) > best:  # F's upper bound
                best = max(best, f_measure(tokens, other))
        return best

    def is_similar(self, text: str) -> bool:
        return self.most_similar(text) >= self.threshold
