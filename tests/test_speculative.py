"""Speculative decoding: greedy output identical to plain decoding for every drafter and draft length, the
sampling rule leaving the target's distribution unchanged (a statistical test), and the CLI's refusals."""

from __future__ import annotations

import pytest
import torch

from slmkit.cli import main
from slmkit.collab import DraftModel, PromptLookup, SpecStats, speculative_generate, verify
from slmkit.generate import GenerationConfig, distribution, generate
from test_serve import tiny_model, tok  # noqa: F401 (tok: a fixture)

PROMPTS = ([5, 9, 13, 5, 9], list(range(3, 30)) * 2, [7] * 4, [3, 4])


@pytest.fixture(scope="module")
def target():
    return tiny_model(sliding_window=None)


def drafters(target):
    yield "lookup-1", PromptLookup(1)
    yield "lookup-3", PromptLookup(3)
    yield "other model", DraftModel(tiny_model(seed=1), 256)
    yield "itself", DraftModel(target, 256)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_output_is_the_targets_own(target, k):
    for prompt in PROMPTS:
        want = list(generate(target, prompt, GenerationConfig(max_new_tokens=40)))
        for name, drafter in drafters(target):
            stats = SpecStats()
            got = list(speculative_generate(target, prompt, GenerationConfig(max_new_tokens=40), drafter, k,
                                            stats=stats))
            assert got == want, (name, prompt)
            assert stats.accepted <= stats.drafted <= k * stats.steps
            if name == "itself":  # a draft equal to the target is always right
                assert stats.accepted == stats.drafted > 0


def test_sliding_window_target_with_a_draft():
    target = tiny_model(sliding_window=6)
    want = list(generate(target, list(range(3, 20)), GenerationConfig(max_new_tokens=30)))
    got = list(speculative_generate(target, list(range(3, 20)), GenerationConfig(max_new_tokens=30),
                                    DraftModel(tiny_model(sliding_window=6, seed=2), 256), 3))
    assert got == want


def test_stop_token_and_limit(target):
    free = list(generate(target, [5, 9, 13, 5, 9], GenerationConfig(max_new_tokens=30)))
    cfg = GenerationConfig(max_new_tokens=30, stop_ids={free[6]})
    got = list(speculative_generate(target, [5, 9, 13, 5, 9], cfg, DraftModel(target, 256), 5))
    assert got == free[:free.index(free[6])]
    assert len(list(speculative_generate(target, [5, 9], GenerationConfig(max_new_tokens=3), PromptLookup(2), 7))) == 3


def _draws(p_logits, q, drafts, cfg, n, seed=0):
    """Frequencies of the first emitted token; with q, every round draws its drafts from q (as a draft model
    does), else the drafts are fixed (prompt lookup: q a point mass)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(p_logits.shape[-1])
    for _ in range(n):
        if q is not None:
            drafts = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
        kept, nxt = verify(p_logits, drafts, q, cfg, g)
        first[drafts[0] if kept else nxt] += 1
    return first / n


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_sampling_keeps_the_target_distribution(drafter):
    """The first emitted token's frequencies over 8,000 verifications match the target's p (and not q):
    within 4.5 standard errors per token."""
    torch.manual_seed(0)
    V, cfg = 6, GenerationConfig(temperature=1.0)
    p_logits = torch.randn(3, V) * 1.5
    q = distribution(torch.randn(2, V) * 1.5, cfg) if drafter == "model" else None
    drafts = [2, 1]  # with q: redrawn from q every round
    n = 8_000
    freq = _draws(p_logits, q, drafts, cfg, n)
    p = distribution(p_logits[0], cfg)
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4.5 * se + 1e-4).all(), (freq, p)
    if q is not None:
        assert (freq - q[0]).abs().max() > 0.05  # the test can tell p from q


def test_sampled_generation_follows_the_target_end_to_end(target):
    """Two-token continuations sampled with a draft model vs without: the same distribution (total variation
    over the 30 likeliest pairs within sampling noise)."""
    cfg = GenerationConfig(max_new_tokens=2, temperature=1.5)
    draft = DraftModel(tiny_model(seed=1), 64)
    plain, spec = {}, {}
    for s in range(1500):
        a = tuple(generate(target, [5, 9], GenerationConfig(2, 1.5, seed=s)))
        b = tuple(speculative_generate(target, [5, 9], GenerationConfig(2, 1.5, seed=10_000 + s), draft, 2))
        plain[a], spec[b] = plain.get(a, 0) + 1, spec.get(b, 0) + 1
    top = sorted(plain, key=plain.get, reverse=True)[:30]
    tv = sum(abs(plain.get(t, 0) - spec.get(t, 0)) for t in top) / 1500 / 2
    assert tv < 0.06, tv


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "x", "--draft", "a", "--backend", "llamacpp"], "--backend torch"),
    (["generate", "--prompt", "x", "--draft", "a", "--prompt-lookup", "2"], "not both"),
    (["generate", "--prompt", "x", "--prompt-lookup", "2", "--draft-tokens", "0"], "--draft-tokens must be"),
])
def test_cli_refusals(argv, message, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, tok):
    from conftest import VOCAB
    from slmkit.checkpoint import save_checkpoint
    from slmkit.collab import make_drafter
    from slmkit.errors import SlmError
    from slmkit.loader import LoadedModel

    target = LoadedModel(tiny_model(), tok, "target", "slmkit", 0)
    save_checkpoint(tiny_model(seed=3), tok, tmp_path / "same")
    assert isinstance(make_drafter(target, str(tmp_path / "same")), DraftModel)
    wide = tiny_model()
    wide.embed = torch.nn.Embedding(VOCAB + 8, wide.cfg.dim)
    wide.cfg.vocab_size = VOCAB + 8
    save_checkpoint(wide, tok, tmp_path / "wide")
    with pytest.raises(SlmError, match=f"vocabulary of {VOCAB + 8} tokens, the target {VOCAB}"):
        make_drafter(target, str(tmp_path / "wide"))
