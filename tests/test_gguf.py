"""GGUF: our header reader and torch dequantizers against the `gguf` package, and F32 export round trips."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from slmkit import convert
from slmkit.checkpoint import export_gguf
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.gguf_io import dequantize, read_gguf, read_header
from slmkit.loader import load
from slmkit.model import Decoder

from test_cli import tiny_tokenizer


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                                   GGMLQuantizationType.F16, GGMLQuantizationType.BF16])
def test_dequantizers_match_gguf_reference(qtype):
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    packed = gguf_quantize(weights, qtype)  # [8, bytes per row]
    expected = gguf_dequantize(packed, qtype)
    ours = dequantize(torch.from_numpy(packed.view(np.uint8).reshape(-1).copy()), int(qtype), (8, 256))
    assert torch.equal(ours, torch.from_numpy(expected.astype(np.float32)))


def test_llama_cpp_permutation_round_trips():
    w = torch.randn(6 * 8, 5)  # 6 heads of dim 8
    permuted = convert.llama_cpp_permute(w, 6)
    assert not torch.equal(permuted, w)
    assert torch.equal(convert.llama_cpp_unpermute(permuted, 6), w)
    assert torch.equal(permuted[:2], w[[0, 4]])  # rows (0, D/2) of head 0 become an adjacent pair


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      max_seq_len=64, rope_theta=50000.0)
    model = Decoder(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    return model, tok


@pytest.mark.parametrize("dtype, tol", [("f32", 1e-5), ("f16", 5e-2)])
def test_float_export_round_trip(tiny_model, tmp_path, dtype, tol):
    model, tok = tiny_model
    path = export_gguf(model, tok, tmp_path / f"tiny-{dtype}.gguf", file_type=dtype.upper())
    lm = load(path)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (lm.model(tokens) - model(tokens)).abs().max().item() < tol
    assert lm.tokenizer.encode("the quick brown fox") == tok.encode("the quick brown fox")
    assert lm.model.cfg.rope_theta == 50000.0 and lm.model.cfg.n_kv_heads == 2


def test_export_refuses_existing_output(tiny_model, tmp_path):
    model, tok = tiny_model
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(SlmError, match="exists"):
        export_gguf(model, tok, out)
    assert out.read_bytes() == b"keep me"


def test_llama_cpp_runs_our_export(tiny_model, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = tiny_model
    path = export_gguf(model, tok, tmp_path / "tiny.gguf")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = tok.encode("hello world small models")
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    # llama.cpp keeps its KV cache in f16 by default: agreement is relative to the logits' scale (~20 here)
    assert (theirs - ours).abs().max().item() < 2e-4 * ours.abs().max().item()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_header_of_default_model():
    from slmkit.loader import default_model_path

    meta, infos, _ = read_header(default_model_path())
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert len(infos) == 272 and infos[0].shape == (49152, 576)


def test_read_gguf_rejects_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(SlmError):
        read_gguf(bad)
