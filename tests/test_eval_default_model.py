"""The evaluator on the real default model against the reference figures in ../shared/reference/."""

import pytest

from slmkit.eval.data import read_text
from slmkit.eval.perplexity import PerplexityProtocol, perplexity
from slmkit.eval.tasks import evaluate_task, load_task, loglikelihoods
from slmkit.loader import load

from test_default_model import SHARED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    return load()


def test_wikitext2_shared_protocol(lm):
    """`slm eval --tasks wikitext2 --window 512 --max-windows 40`: 28.739 (transformers and llama.cpp)."""
    text = read_text("wikitext2")
    ids = lm.tokenizer.encode(text.text)
    expected = [int(t) for t in (SHARED / "reference/wikitext2-raw-lf.smollm2.ids-40x512.txt").read_text().split()]
    assert len(ids) == 301948 and ids[:len(expected)] == expected
    result = perplexity(lm.model, lm.tokenizer, text, PerplexityProtocol(512, max_windows=40))
    assert result["tokens_scored"] == 20440
    assert abs(result["perplexity"] / 28.739 - 1) < 0.001
    assert abs(result["mean_nll"] - 3.35825) < 1e-4


def test_arc_easy_first_300_matches_reference(lm):
    questions, _ = load_task("arc_easy")
    result = evaluate_task(lm.model, lm.tokenizer, questions[:300], batch_size=16)
    assert abs(result["acc"] - 0.503) < 0.004 and abs(result["acc_norm"] - 0.477) < 0.004


def test_loglikelihoods_are_batch_invariant_on_the_real_model(lm):
    questions, _ = load_task("arc_easy")
    pairs = [pair for q in questions[:10] for pair in q.pairs]
    one, eight, many = (loglikelihoods(lm.model, lm.tokenizer, pairs, b) for b in (1, 8, 32))
    assert max(abs(a - b) for a, b in zip(one, eight)) < 1e-4
    assert max(abs(a - b) for a, b in zip(one, many)) < 1e-4
