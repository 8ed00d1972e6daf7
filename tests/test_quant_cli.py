"""`slm quantize` end to end on a tiny model: every method, KV-cache bits, and bad input (exit 2, nothing written)."""

import json
from pathlib import Path

import pytest
import torch

from slmkit import loader
from slmkit.checkpoint import save_checkpoint
from slmkit.config import ModelConfig
from slmkit.model import Decoder

from test_cli import CORPUS, run, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> Path:
    """A tiny model whose widths (64, 128) and head dim (32) take groups of 32."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                      max_seq_len=128, eos_token_id=tok.eos_token_id)
    return save_checkpoint(Decoder(cfg), tok, tmp_path_factory.mktemp("m") / "tiny32")


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(CORPUS))
    return path


def quantize(capsys, model, out, *extra, calib=None):
    return run(capsys, "quantize", str(model), "--calib", str(calib), "--calib-samples", "4", "--calib-length", "16",
               "-o", str(out), *extra)


@pytest.mark.parametrize("method,extra,bits", [("rtn", [], 4), ("rtn", ["--imatrix", "--bits", "3"], 3),
                                               ("gptq", ["--asym"], 4), ("gptq", ["--no-act-order", "--damp", "0.1"], 4),
                                               ("gptq", ["--search", "--refit", "2", "--bits", "3"], 3),
                                               ("awq", ["--bits", "8"], 8), ("smoothquant", ["--alpha", "0.7"], 8)])
def test_every_method_writes_a_packed_checkpoint(tiny32, calib_text, tmp_path, capsys, method, extra, bits):
    code, out, err = quantize(capsys, tiny32, tmp_path / "q", "--method", method, *extra, calib=calib_text)
    assert code == 0, err
    lm = loader.load(out.strip())
    step = lm.model.compression[0]
    assert step["method"] == method and step["scheme"]["bits"] == bits
    assert step["calib"] == {"source": str(calib_text), "samples": 4, "length": 16, "seed": 0}
    if "--refit" in extra:
        assert step["search"] is True and step["refit"] == 2
    q = lm.model.blocks[0].mlp.down_proj
    assert q.scheme.bits == bits and q.qweight.dtype == torch.uint8
    code, info, _ = run(capsys, "info", out.strip(), "--json")
    stored_bits = {3: 4}.get(bits, bits)  # a loose bound for 3 bits: the tiny model's tables weigh more
    float_bytes = 4 * json.loads(info)["params"]
    assert json.loads(info)["weight_bytes"] < float_bytes * (stored_bits + 2) / 32


def test_awq_scales_then_gptq_are_two_recorded_steps(tiny32, calib_text, tmp_path, capsys):
    code, out, err = quantize(capsys, tiny32, tmp_path / "q", "--method", "gptq", "--awq-scales", calib=calib_text)
    assert code == 0, err
    steps = loader.load(out.strip()).model.compression
    assert [s["method"] for s in steps] == ["awq", "gptq"] and steps[0]["quantize"] is False
    code, _, err = quantize(capsys, tiny32, tmp_path / "r", "--method", "awq", "--awq-scales", calib=calib_text)
    assert code == 2 and "--awq-scales goes before gptq or rtn" in err and not (tmp_path / "r").exists()


def test_kv_bits_are_kept_for_generation(tiny32, calib_text, tmp_path, capsys):
    code, out, err = quantize(capsys, tiny32, tmp_path / "q", "--method", "rtn", "--kv-bits", "4", calib=calib_text)
    assert code == 0, err
    lm = loader.load(out.strip())
    assert lm.model.kv_scheme.bits == 4 and type(lm.model.new_cache(1, 8)).__name__ == "QuantKVCache"
    code, text, err = run(capsys, "generate", out.strip(), "--prompt", "the quick", "--max-new-tokens", "4")
    assert code == 0, err


@pytest.mark.parametrize("extra,message", [(["--bits", "9"], "bits must be 2..8"),
                                           (["--bits", "1"], "bits must be 2..8"),
                                           (["--group-size", "48"], "does not divide"),
                                           (["--method", "gptq", "--imatrix"], "gptq has no option imatrix"),
                                           (["--calib-samples", "400"], "asked for 400")])
def test_bad_input_exits_2_and_writes_nothing(tiny32, calib_text, tmp_path, capsys, extra, message):
    code, _, err = quantize(capsys, tiny32, tmp_path / "q", *extra, calib=calib_text)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny32, calib_text, tmp_path, capsys):
    (tmp_path / "q").mkdir()
    code, _, err = quantize(capsys, tiny32, tmp_path / "q", "--method", "rtn", calib=calib_text)
    assert code == 2 and "exists" in err
    code, _, err = quantize(capsys, tiny32, tmp_path / "q", "--method", "rtn", "--force", calib=calib_text)
    assert code == 0, err
