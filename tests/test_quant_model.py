"""Quantization of whole (tiny) models: every algorithm runs, shrinks the weights, keeps the outputs close,
saves and loads packed, and is recorded as a re-runnable pipeline step."""

import json

import pytest
import torch

from slmkit import loader
from slmkit.calib import CalibConfig, layerwise
from slmkit.checkpoint import save_checkpoint
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.info import weight_bytes
from slmkit.model import Decoder
from slmkit.modules import LayerFilter
from slmkit.pipeline import step_record
from slmkit.steps import step_from_record
from slmkit.quant import (AWQConfig, GPTQConfig, KVCacheConfig, QScheme, RTNConfig, SmoothQuantConfig,
                          quantize_)
from slmkit.quant.packed import QuantEmbedding, QuantLinear

from conftest import randomize, tokens

CFG = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


def tiny_model(seed=0, cfg=CFG) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        randomize(model, seed=seed)
        model.blocks[0].attn_norm.weight[:4] *= 6  # outlier channels, as real models have
    return model


def calib(n=8, T=32):
    return torch.randint(0, 300, (n, T), generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def rel_error(model, reference, seq=None):
    seq = tokens(32) if seq is None else seq
    a, b = model(seq), reference(seq)
    return ((a - b).norm() / b.norm()).item()


def quantized(cfg, seed=0, data=None):
    model = tiny_model(seed)
    return quantize_(model, cfg, calib() if data is None else data)


ALGORITHMS = {
    "rtn": RTNConfig(QScheme(4, 32), search=False),
    "rtn-search": RTNConfig(QScheme(4, 32)),
    "rtn-imatrix": RTNConfig(QScheme(4, 32), imatrix=True),
    "gptq": GPTQConfig(QScheme(4, 32)),
    "gptq-noorder": GPTQConfig(QScheme(4, 32), act_order=False),
    "awq": AWQConfig(QScheme(4, 32)),
    "smoothquant": SmoothQuantConfig(),
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_packs_the_model_and_stays_close(name):
    reference = tiny_model()
    model = quantized(ALGORITHMS[name])
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("_proj"))
    assert isinstance(model.embed, QuantEmbedding)
    assert sum(weight_bytes(model).values()) < 0.45 * sum(weight_bytes(reference).values())
    assert rel_error(model, reference) < (0.05 if name == "smoothquant" else 0.4)  # measured 0.04 and 0.24-0.29
    assert model.compression[-1]["method"] == ALGORITHMS[name].method


def test_calibrated_methods_beat_plain_rtn_at_three_bits():
    reference = tiny_model()
    seq = calib(4, 32)
    rtn = rel_error(quantized(RTNConfig(QScheme(3, 32), search=False, embedding=None)), reference, seq)
    for cfg in (GPTQConfig(QScheme(3, 32), embedding=None), AWQConfig(QScheme(3, 32), embedding=None),
                RTNConfig(QScheme(3, 32), imatrix=True, embedding=None)):
        assert rel_error(quantized(cfg), reference, seq) < rtn, cfg.method


def test_awq_scales_alone_keep_the_float_function():
    reference = tiny_model()
    model = quantized(AWQConfig(QScheme(4, 32), quantize=False))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert rel_error(model, reference) < 1e-5
    quantize_(model, GPTQConfig(QScheme(4, 32)), calib())  # AWQ scales, then GPTQ codes
    assert [s["method"] for s in model.compression] == ["awq", "gptq"]


def test_layer_filter_and_float_embedding():
    model = quantized(RTNConfig(QScheme(4, 32), embedding=None, layers=LayerFilter(exclude=("*.mlp.down_proj",))))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds["blocks.0.mlp.down_proj"] == "Linear" and kinds["blocks.0.mlp.up_proj"] == "QuantLinear"
    assert isinstance(model.embed, torch.nn.Embedding)


def test_checkpoint_round_trip_keeps_codes_and_steps(tmp_path, tokenizer):
    model = quantized(GPTQConfig(QScheme(4, 32, symmetric=False)))
    quantize_(model, KVCacheConfig(QScheme(8, 0, False)))
    out = save_checkpoint(model, tokenizer, tmp_path / "q")
    lm = loader.load(out)
    assert torch.equal(lm.model(tokens(16)), model(tokens(16)))
    assert lm.model.compression == model.compression and lm.model.kv_scheme == QScheme(8, 0, False)
    assert lm.file_bytes < 0.5 * 4 * sum(p.numel() for p in tiny_model().parameters())
    q = lm.model.blocks[1].mlp.down_proj
    assert q.qweight.dtype == torch.uint8 and q.scales.dtype == torch.float16 and q.offsets is not None
    lm16 = loader.load(out, dtype=torch.bfloat16)  # packed weights stay packed whatever the float dtype
    assert lm16.model.blocks[1].mlp.down_proj.qweight.dtype == torch.uint8


def test_recorded_steps_rerun_to_the_same_model():
    model = quantized(GPTQConfig(QScheme(4, 32), layers=LayerFilter(exclude=("*.k_proj",)),
                                 calib=CalibConfig(samples=8, length=32)))
    record = model.compression[0]
    cfg = step_from_record(json.loads(json.dumps(record)))  # as read back from slmkit.json
    assert cfg == GPTQConfig(QScheme(4, 32), layers=LayerFilter(exclude=("*.k_proj",)),
                             calib=CalibConfig(samples=8, length=32))
    again = quantized(cfg)
    assert torch.equal(again(tokens(16)), model(tokens(16)))
    with pytest.raises(SlmError, match="unknown pipeline step"):
        step_from_record({"method": "zip"})
    assert step_record(cfg) == record


def test_kv_cache_quantization_generation_is_close_and_small():
    model = tiny_model()
    seq = tokens(24)
    ref_cache, ref = model.new_cache(1, 32), None
    with torch.no_grad():
        ref = model(seq, ref_cache)
        errs = {}
        for bits in (8, 4):
            quantize_(model, KVCacheConfig(QScheme(bits, 0 if bits == 8 else 16, False)))
            cache = model.new_cache(1, 32)
            errs[bits] = ((model(seq, cache) - ref).norm() / ref.norm()).item()
            float_bytes = sum(k.numel() * 4 * 2 for k in ref_cache.keys)
            assert cache.nbytes < float_bytes * (bits / 32 + 0.1)
    assert errs[8] < 0.02 and errs[4] < 0.2 and errs[8] < errs[4]  # measured 0.013, 0.12 (a chaotic random model)


def test_bad_input_is_refused():
    with pytest.raises(SlmError, match="does not divide"):
        quantized(RTNConfig(QScheme(4, 48)))
    with pytest.raises(SlmError, match="bits must be 2..8"):
        quantized(RTNConfig(QScheme(9, 32)))
    with pytest.raises(SlmError, match="needs calibration"):
        quantize_(tiny_model(), GPTQConfig())
    nan_model = tiny_model()
    with torch.no_grad():
        nan_model.blocks[0].attn_norm.weight[0] = float("nan")
    with pytest.raises(SlmError, match="non-finite calibration activation"):
        quantize_(nan_model, GPTQConfig(), calib())


def test_layerwise_inputs_match_the_full_model():
    model = tiny_model()
    data = calib(2, 16)
    seen = []
    for i, block, run in layerwise(model, data, "check"):
        seen.append(run())
    with torch.no_grad():
        x = model.embed(data)
        for i, block in enumerate(model.blocks):
            x = block(x, model.rope[:, :16], torch.ones(16, 16).tril().bool(), None, i, 0)
            assert torch.allclose(seen[i], x, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_code_bytes_follow_the_bit_width(bits):
    """Codes take exactly `bits` bits in memory and in the checkpoint, 3/5/6/7 bits included (a bit stream)."""
    model = quantized(RTNConfig(QScheme(bits, 32), search=False, embedding=None))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert sum(m.qweight.numel() for m in layers) * 8 == bits * sum(m.weight_numel for m in layers)
