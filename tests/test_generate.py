"""Sampling, stopping, streaming and timings of generation, on a tiny random model."""

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import SlmError
from slmkit.generate import GenerationConfig, TextStream, Timings, generate, sample
from slmkit.model import Decoder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(preset("tiny")).eval()


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.0])
    assert sample(logits, GenerationConfig(), None) == 1


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(100)
    g = torch.Generator().manual_seed(1)
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_k=1), g) for _ in range(20)}
    assert picks == {int(logits.argmax())}


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_p=0.7), g) for _ in range(200)}
    assert picks == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.3]))
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, GenerationConfig(temperature=1.0), g) for _ in range(2000)]
    assert abs(draws.count(0) / 2000 - 0.7) < 0.04


def test_seeded_sampling_is_reproducible(model):
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=50, seed=3)
    assert list(generate(model, [1, 2, 3], cfg)) == list(generate(model, [1, 2, 3], cfg))


def test_greedy_generation_equals_repeated_full_forward(model):
    ids = [5, 9, 13]
    out = list(generate(model, ids, GenerationConfig(max_new_tokens=8)))
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


def test_stop_token_ends_generation_and_is_not_yielded(model):
    first = next(iter(generate(model, [1, 2], GenerationConfig(max_new_tokens=5))))
    timings = Timings()
    assert list(generate(model, [1, 2], GenerationConfig(max_new_tokens=5, stop_ids={first}), timings)) == []
    assert timings.new_tokens == 1


def test_generation_respects_context_length(model):
    n = model.cfg.max_seq_len
    out = list(generate(model, list(range(1, n - 3)), GenerationConfig(max_new_tokens=50)))
    assert len(out) == 4
    with pytest.raises(SlmError, match="fills the context"):
        list(generate(model, [1] * n, GenerationConfig(max_new_tokens=5)))


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -1)])
def test_bad_generation_settings(field, value):
    with pytest.raises(SlmError):
        GenerationConfig(**{field: value}).validate()


def test_text_stream_waits_for_complete_characters():
    class Bytes:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")
    stream = TextStream(Bytes())
    euro = "€".encode()
    assert [stream.push(b) for b in euro] == ["", "", "€"]
