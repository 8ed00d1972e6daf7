"""Reference parity on the real default model (SmolLM2-135M-Instruct GGUF): slmkit vs transformers' own loading."""

from pathlib import Path

import pytest
import torch

from slmkit.generate import GenerationConfig, generate
from slmkit.loader import default_model_path, load

SHARED = Path(__file__).resolve().parents[2] / "shared"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ours():
    return load()


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


PROMPT = "The history of the Roman Empire begins with"


def test_logits_match_transformers(ours, reference):
    ids = torch.tensor([ours.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        diff = (ours.model(ids) - reference(ids).logits).abs().max().item()
    assert diff < 1e-3, diff


def test_decode_step_logits_match_full_forward(ours):
    ids = ours.tokenizer.encode(PROMPT)
    with torch.no_grad():
        full = ours.model(torch.tensor([ids]))[0, -1]
        cache = ours.model.new_cache(1, len(ids))
        ours.model(torch.tensor([ids[:-1]]), cache, 0)
        step = ours.model(torch.tensor([ids[-1:]]), cache, len(ids) - 1)[0, -1]
    assert (full - step).abs().max().item() < 1e-3


def test_32_greedy_tokens_identical_to_transformers(ours, reference):
    ids = ours.tokenizer.encode(PROMPT)
    mine = list(generate(ours.model, ids, GenerationConfig(max_new_tokens=32)))
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
    theirs = out[0, len(ids):].tolist()
    assert len(mine) == 32
    assert mine == theirs


def test_tokenizer_matches_reference_ids(ours):
    text = (SHARED / "data/wikitext2/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    expected = [int(t) for t in (SHARED / "reference/wikitext2-raw-lf.smollm2.ids-40x512.txt").read_text().split()]
    ids = ours.tokenizer.encode(text[:120_000])
    assert ids[:10_000] == expected[:10_000]


def test_chat_template_and_stop_token(ours):
    tok = ours.tokenizer
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text
    assert tok.stop_ids() == {tok.backend.token_to_id("<|im_end|>")}


def test_bf16_generation_is_coherent(ours):
    lm = load(dtype=torch.bfloat16)
    ids = lm.tokenizer.encode(lm.tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    cfg = GenerationConfig(max_new_tokens=16, stop_ids=lm.tokenizer.stop_ids())
    assert "Paris" in lm.tokenizer.decode(list(generate(lm.model, ids, cfg)))


def test_bf16_weights_halve_bytes_and_keep_predictions(ours):
    from slmkit.info import weight_bytes

    lm = load(dtype=torch.bfloat16)
    assert lm.model.norm.weight.dtype == torch.float32 and lm.model.embed.weight.dtype == torch.bfloat16
    fp32, bf16 = sum(weight_bytes(ours.model).values()), sum(weight_bytes(lm.model).values())
    assert 0.49 < bf16 / fp32 < 0.51
    ids = torch.tensor([ours.tokenizer.encode(PROMPT + " the founding of the city in 753 BC, when")])
    with torch.no_grad():
        a, b = ours.model(ids).log_softmax(-1), lm.model(ids).log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    assert kl < 0.01 and (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9
