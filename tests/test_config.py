"""ModelConfig validation, presets and the model's structural features."""

import pytest
import torch

from slmkit.config import ModelConfig, PRESETS, layerwise_scaling, preset
from slmkit.errors import SlmError
from slmkit.model import Decoder, attention_mask, count_parameters


@pytest.mark.parametrize("fields, message", [
    (dict(n_heads=8, n_kv_heads=3), "does not divide n_heads"),
    (dict(dim=0), "dim must be positive"),
    (dict(n_layers=-2), "n_layers must be positive"),
    (dict(n_layers=6, share_blocks=4), "share_blocks 4 does not divide n_layers 6"),
    (dict(dim=100, n_heads=8), "not divisible by n_heads"),
    (dict(mlp="moe"), "mlp must be one of"),
    (dict(layer_n_heads=[4, 4]), "layer_n_heads needs 8 entries"),
    (dict(n_kv_heads=0), "n_kv_heads must be positive"),
])
def test_contradictions_are_rejected(fields, message):
    with pytest.raises(SlmError, match=message):
        ModelConfig(**fields).validate()


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(SlmError, match="unknown field"):
        ModelConfig.from_dict({"dim": 64, "bogus": 1})


def test_round_trip_through_dict():
    cfg = preset("openelm-style-100m")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    with torch.device("meta"):
        model = Decoder(preset(name))
    assert count_parameters(model)["total"] > 0


def test_attention_variants_shapes():
    for kv in (8, 2, 1):  # multi-head, grouped-query, multi-query
        model = Decoder(ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=8, n_kv_heads=kv, ffn_dim=96))
        assert model(torch.randint(0, 100, (2, 5))).shape == (2, 5, 100)
        assert model.blocks[0].attn.k_proj.weight.shape == (kv * 8, 64)


@pytest.mark.parametrize("mlp, act, norm", [("swiglu", "silu", "rmsnorm"), ("geglu", "gelu_tanh", "rmsnorm"),
                                            ("mlp", "relu", "layernorm"), ("mlp", "gelu", "layernorm")])
def test_mlp_and_norm_variants(mlp, act, norm):
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, ffn_dim=48, mlp=mlp, activation=act, norm=norm)
    model = Decoder(cfg)
    assert (model.blocks[0].mlp.gate_proj is None) == (mlp == "mlp")
    assert torch.isfinite(model(torch.randint(0, 50, (1, 4)))).all()


def test_layer_sharing_reuses_blocks():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=6, n_heads=4, ffn_dim=48, share_blocks=3)
    model = Decoder(cfg)
    assert len(model.blocks) == 2 and len(model.new_cache().keys) == 6
    unshared = Decoder(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_dim=48))
    assert count_parameters(model)["total"] == count_parameters(unshared)["total"]


def test_layerwise_scaling_grows_widths():
    scaled = layerwise_scaling(4, 256, 32, gqa_group=2)
    assert scaled["layer_n_heads"] == sorted(scaled["layer_n_heads"]) and scaled["layer_n_heads"][0] < scaled["layer_n_heads"][-1]
    model = Decoder(ModelConfig(vocab_size=50, dim=256, n_layers=4, n_heads=8, ffn_dim=512, head_dim=32, **scaled))
    assert model.blocks[0].mlp.up_proj.weight.shape[0] == scaled["layer_ffn_dims"][0]
    assert torch.isfinite(model(torch.randint(0, 50, (1, 6)))).all()


def test_sliding_window_mask():
    mask = attention_mask(5, 0, 2)
    assert mask.tolist()[4] == [False, False, False, True, True]
    assert attention_mask(1, 7, None) is None
    assert attention_mask(1, 7, 4).tolist() == [[False] * 4 + [True] * 4]


def test_sliding_window_changes_far_context_only():
    base = dict(vocab_size=50, dim=32, n_layers=1, n_heads=4, ffn_dim=48)
    torch.manual_seed(0)
    full = Decoder(ModelConfig(**base))
    windowed = Decoder(ModelConfig(**base, sliding_window=3))
    windowed.load_state_dict(full.state_dict())
    tokens = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        a, b = full(tokens), windowed(tokens)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5) and not torch.allclose(a[:, 7], b[:, 7], atol=1e-3)


def test_cache_decode_matches_full_forward_for_shared_and_windowed_models():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=60, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48, share_blocks=2,
                      sliding_window=4, sliding_layers=[True, False], qk_norm=True, qkv_bias=True)
    model = Decoder(cfg).eval()
    tokens = torch.randint(0, 60, (1, 10))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(1, 10)
        steps = [model(tokens[:, :6], cache, 0)[:, -1]] + [model(tokens[:, i:i + 1], cache, i)[:, -1] for i in range(6, 10)]
    assert torch.allclose(torch.stack([full[:, i] for i in range(5, 10)]), torch.stack(steps), atol=1e-4)
