"""Hugging Face families load into slmkit's decoder with transformers' logits (fp32, 1e-4), with and without the
KV cache. Each model is a tiny random transformers model saved locally; every weight (norms and biases included)
is randomised so that norm offsets, biases, RoPE, sliding windows and scaling all move the logits."""

from __future__ import annotations

import pytest
import torch
from conftest import HF_FAMILIES, SEQ, WINDOW, hf_folder, tokens

from slmkit import loader
from slmkit.config import RopeScaling

TOL = 1e-4


@pytest.fixture(scope="module", params=list(HF_FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, slmkit LoadedModel, transformers' logits [1, SEQ, V] on tokens(SEQ))."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = hf_folder(request.param, folder)
    loaded = loader.load(folder)
    with torch.no_grad():
        expected = reference(tokens(SEQ)).logits
    return request.param, reference, loaded, expected


@torch.no_grad()
def test_logits_match_transformers(family):
    name, _, loaded, expected = family
    assert loaded.kind == "hf"
    got = loaded.model(tokens(SEQ))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL, name


@torch.no_grad()
def test_batched_logits_match_transformers(family):
    """Two different rows at once give each row's own logits."""
    name, reference, loaded, _ = family
    batch = torch.cat([tokens(SEQ, seed=2), tokens(SEQ, seed=3)])
    assert (loaded.model(batch) - reference(batch).logits).abs().max().item() < TOL, name


@torch.no_grad()
def test_kv_cache_decode_matches_full_sequence(family):
    """Prefill part of the sequence, then decode one token at a time past the sliding window."""
    name, _, loaded, expected = family
    ids, prefill = tokens(SEQ), 5
    cache = loaded.model.new_cache(batch=1, max_len=SEQ)
    got = [loaded.model(ids[:, :prefill], cache, 0)]
    for pos in range(prefill, SEQ):
        got.append(loaded.model(ids[:, pos:pos + 1], cache, pos))
    got = torch.cat(got, dim=1)
    assert (got - expected).abs().max().item() < TOL, name


@torch.no_grad()
def test_last_only_is_the_last_row(family):
    _, _, loaded, expected = family
    got = loaded.model(tokens(SEQ), last_only=True)
    assert (got - expected[:, -1:]).abs().max().item() < TOL


def test_config_mapping(family):
    """The features each family exercises are read from config.json, not defaulted."""
    name, reference, loaded, _ = family
    cfg, hf = loaded.model.cfg, reference.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ffn_dim) == (
        hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        hf.intermediate_size)
    assert cfg.head_size == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.family == HF_FAMILIES[name][2]
    expected_sliding = {
        "llama": [False] * 2, "smollm": [False] * 3, "qwen2": [False] * 2, "qwen2-sliding": [False, True, True],
        "mistral": [True] * 2, "gemma3": [True, False, True, True]}[name]
    assert [cfg.is_sliding(i) for i in range(cfg.n_layers)] == expected_sliding
    if any(expected_sliding):
        assert cfg.sliding_window == WINDOW < SEQ
    if name == "llama":
        assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16) and cfg.rope_theta == 500.0
    if name.startswith("qwen2"):
        assert cfg.qkv_bias
    if name == "gemma3":
        assert cfg.qk_norm and cfg.sandwich_norm and cfg.mlp == "geglu" and cfg.activation == "gelu_tanh"
        assert (cfg.rope_theta, cfg.rope_local_theta) == (2000.0, 50.0)
        assert cfg.embed_scale == pytest.approx(8.0) and cfg.attn_scale == pytest.approx(24 ** -0.5)


def test_tokenizer_read_from_folder(family):
    _, _, loaded, _ = family
    tok = loaded.tokenizer
    assert tok.encode("w5 w17 w299") == [5, 17, 299]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


@torch.no_grad()
def test_qwen2_sliding_without_layer_types(tmp_path):
    """Older Qwen2 config.json files have no layer_types: layers from max_window_layers on slide."""
    import json

    reference = hf_folder("qwen2-sliding", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = loader.load(tmp_path)
    assert [loaded.model.cfg.is_sliding(i) for i in range(3)] == [False, True, True]
    assert (loaded.model(tokens(SEQ)) - reference(tokens(SEQ)).logits).abs().max().item() < TOL
