"""Writing models: Hugging Face export that transformers loads with the same logits (every family, shared and
layer-wise scaled models unrolled to a plain layout), and slmkit's own checkpoint round trip."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import transformers
from conftest import HF_FAMILIES, SEQ, VOCAB, WINDOW, hf_folder, randomize, tokens

from slmkit import loader
from slmkit.checkpoint import export_hf, save_checkpoint
from slmkit.config import ModelConfig, layerwise_scaling
from slmkit.errors import SlmError
from slmkit.model import Decoder

TOL = 1e-4


def explicit_head_dim(cfg: ModelConfig) -> ModelConfig:
    """The same config with head_dim spelled out (Qwen2's config.json omits it when it is dim / n_heads)."""
    return dataclasses.replace(cfg, head_dim=cfg.head_size)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def transformers_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()(ids).logits


# ---- every Hugging Face family: load, export, transformers reads the export ----------------------------
@pytest.mark.parametrize("name", list(HF_FAMILIES))
@torch.no_grad()
def test_export_round_trip(name, tmp_path, tokenizer):
    reference = hf_folder(name, tmp_path / "src")
    expected = reference(tokens(SEQ)).logits
    loaded = loader.load(tmp_path / "src")
    out = export_hf(loaded.model, loaded.tokenizer, tmp_path / "out")

    assert max_diff(transformers_logits(out, tokens(SEQ)), expected) < TOL
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == reference.config.model_type
    assert hf["architectures"] == [type(reference).__name__]
    again = loader.load(out)  # and slmkit reads its own export back to the same config
    assert explicit_head_dim(again.model.cfg) == explicit_head_dim(loaded.model.cfg)
    assert again.tokenizer.encode("w5 w17") == [5, 17]
    assert (again.tokenizer.bos_token_id, again.tokenizer.eos_token_id) == (1, 2)


# ---- shared blocks and layer-wise scaling, exported as plain uniform layers ---------------------------
_BASE = dict(vocab_size=VOCAB, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, max_seq_len=64,
             rope_theta=1000.0, bos_token_id=1, eos_token_id=2)
_GEMMA = dict(family="gemma3", mlp="geglu", activation="gelu_tanh", qk_norm=True, sandwich_norm=True,
              embed_scale=math.sqrt(64), attn_scale=24 ** -0.5, norm_eps=1e-6, sliding_window=WINDOW,
              rope_local_theta=50.0)
CUSTOM = {
    "shared-llama": dict(n_layers=4, share_blocks=2),
    "layerwise-llama": dict(n_layers=3, tie_embeddings=False, layer_n_heads=[2, 4, 6], layer_n_kv_heads=[2, 1, 3],
                            layer_ffn_dims=[64, 96, 160]),  # GQA groups 1, 4, 2
    "openelm-shared": dict(n_layers=8, share_blocks=2, **layerwise_scaling(4, 64, 16, gqa_group=2)),
    "layerwise-qwen2": dict(n_layers=2, family="qwen2", qkv_bias=True, tie_embeddings=False, head_dim=32,
                            layer_n_heads=[4, 2], layer_n_kv_heads=[1, 2], layer_ffn_dims=[128, 64]),
    "mistral-shared": dict(n_layers=4, family="mistral", share_blocks=2, sliding_window=WINDOW),
    "gemma3-shared-layerwise": dict(n_layers=4, share_blocks=2, sliding_layers=[True, False],
                                    layer_n_heads=[2, 4], layer_n_kv_heads=[2, 1], layer_ffn_dims=[64, 128], **_GEMMA),
}


def custom_model(name: str) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**{**_BASE, **CUSTOM[name]}))
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("name", list(CUSTOM))
@torch.no_grad()
def test_export_unrolls_shared_and_scaled_layers(name, tmp_path, tokenizer):
    model = custom_model(name)
    cfg = model.cfg
    expected = model(tokens(SEQ))
    out = export_hf(model, tokenizer, tmp_path / "out")

    hf = json.loads((out / "config.json").read_text())
    assert hf["num_hidden_layers"] == cfg.n_layers  # unrolled: one Hugging Face layer per executed layer
    # padded to the widest layer, and further to a divisor of hidden_size (transformers requires one)
    assert hf["num_attention_heads"] >= max(cfg.heads_of(i)[0] for i in range(cfg.n_stored_layers))
    assert hf["hidden_size"] % hf["num_attention_heads"] == 0
    if cfg.layer_ffn_dims:
        assert hf["intermediate_size"] == max(cfg.layer_ffn_dims)
    assert max_diff(transformers_logits(out, tokens(SEQ)), expected) < TOL
    assert max_diff(loader.load(out).model(tokens(SEQ)), expected) < TOL


@pytest.mark.parametrize("name", ["openelm-shared", "gemma3-shared-layerwise"])
@torch.no_grad()
def test_kv_cache_with_shared_and_scaled_layers(name):
    """Each repeat of a shared block keeps its own cache slot; decode past the window matches the full pass."""
    model = custom_model(name)
    ids = tokens(SEQ)
    expected = model(ids)
    cache = model.new_cache(max_len=SEQ)
    got = [model(ids[:, :3], cache, 0)] + [model(ids[:, p:p + 1], cache, p) for p in range(3, SEQ)]
    assert max_diff(torch.cat(got, dim=1), expected) < TOL


# ---- slmkit's own checkpoint -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["openelm-shared", "gemma3-shared-layerwise"])
@torch.no_grad()
def test_checkpoint_round_trip(name, tmp_path, tokenizer):
    model = custom_model(name)
    parent = tmp_path / "runs"
    parent.mkdir()
    model.compression.append({"method": "none"})
    out = save_checkpoint(model, tokenizer, parent / "ckpt")

    assert [p.name for p in parent.iterdir()] == ["ckpt"]  # no temporary sibling left behind
    loaded = loader.load(out)
    assert loaded.kind == "slmkit"
    assert loaded.model.cfg == model.cfg
    assert loaded.model.compression == [{"method": "none"}]
    assert torch.equal(loaded.model(tokens(SEQ)), model(tokens(SEQ)))
    assert loaded.tokenizer.encode("w5 w17") == [5, 17]

    with pytest.raises(SlmError, match="exists"):
        save_checkpoint(model, tokenizer, out)
    save_checkpoint(custom_model("shared-llama"), tokenizer, out, force=True)
    assert [p.name for p in parent.iterdir()] == ["ckpt"]
    assert loader.load(out).model.cfg == custom_model("shared-llama").cfg


def test_export_refuses_to_overwrite(tmp_path, tokenizer):
    model = custom_model("shared-llama")
    out = export_hf(model, tokenizer, tmp_path / "out")
    with pytest.raises(SlmError, match="exists"):
        export_hf(model, tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("write", [save_checkpoint, export_hf])
def test_interrupted_write_leaves_nothing(write, tmp_path, tokenizer, monkeypatch):
    """A failure while writing (here: the tokenizer) leaves neither the output nor a temporary folder."""
    def fail(folder):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write(custom_model("shared-llama"), tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
