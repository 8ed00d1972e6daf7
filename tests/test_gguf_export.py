"""Quantized GGUF export: GGML block encoders (exact from our codes; Q4_K / Q6_K from float), llama.cpp's
per-tensor type rules, whole-model export read back by our reader and by llama.cpp, `slm export` and its
refusals."""

import numpy as np
import pytest
import torch

from slmkit import loader
from slmkit.checkpoint import export_gguf, save_checkpoint
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.gguf_io import dequantize, read_gguf, read_header
from slmkit.model import Decoder
from slmkit.quant import QScheme, RTNConfig, quantize_
from slmkit.quant.ggml import FILE_TYPES, TYPES, encode_codes, encode_float, file_plan, use_more_bits
from slmkit.quant.scheme import dequantize_weight, quantize_weight

from test_cli import tiny_tokenizer

EXACT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def read_back(blocks: torch.Tensor, name: str, shape) -> torch.Tensor:
    """Our GGUF reader's dequantizer (torch for Q4_0/Q4_1/Q8_0, the gguf package for the rest)."""
    return dequantize(blocks.reshape(-1).contiguous(), TYPES[name].id, tuple(shape))


def spread(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random weights whose magnitude changes every 16 columns, so a misplaced scale shows at once."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp(torch.randn(rows, cols // 16, 1, generator=g) * 1.5)  # [rows, cols/16, 1]
    return (torch.randn(rows, cols // 16, 16, generator=g) * magnitude).reshape(rows, cols)


@pytest.mark.parametrize("name", EXACT)
def test_exact_types_store_our_codes(name):
    scheme = TYPES[name].scheme
    w = spread(6, 128)
    codes, scales, offsets = quantize_weight(w, scheme, search=False)
    blocks = encode_codes(codes, scales, offsets, TYPES[name])
    assert blocks.dtype == torch.uint8 and blocks.shape == (6, 128 // 32 * TYPES[name].nbytes)
    assert torch.equal(read_back(blocks, name, w.shape), dequantize_weight(codes, scales, offsets, scheme))


def test_q8_0_keeps_the_extreme_code():
    """Our symmetric 8-bit grid puts a group's peak on code 0 (-128 in Q8_0's int8): it must survive."""
    w = torch.zeros(1, 32)
    w[0, 3] = -2.0
    codes, scales, offsets = quantize_weight(w, TYPES["Q8_0"].scheme, search=False)
    assert codes[0, 3] == 0
    assert read_back(encode_codes(codes, scales, offsets, TYPES["Q8_0"]), "Q8_0", w.shape)[0, 3] == -2.0


@pytest.mark.parametrize("name, bound", [("Q6_K", 0.025), ("Q4_K", 0.11)])
def test_k_quants_from_float(name, bound):
    """Q4_K / Q6_K blocks read back (by the gguf package's dequantizer) close to the float weights: the error
    of each super-block of 256 is that of a 6- or 4-bit grid (measured 0.018-0.023 and 0.09-0.10 here; a
    scale, min or nibble in the wrong place gives errors of the order of 1, e.g. 3.0 with the scales reversed)."""
    w = spread(8, 512, seed=1)
    blocks = encode_float(w, TYPES[name])
    assert blocks.shape == (8, 2 * TYPES[name].nbytes)
    back = read_back(blocks, name, w.shape)
    per_block = ((back - w).reshape(8, -1, 256).norm(dim=-1) / w.reshape(8, -1, 256).norm(dim=-1))
    assert per_block.max() < bound, per_block


def test_k_quants_of_constant_and_zero_blocks():
    w = torch.zeros(2, 256)
    w[1] = 0.5
    for name in ("Q4_K", "Q6_K"):
        back = read_back(encode_float(w, TYPES[name]), name, w.shape)
        assert torch.allclose(back, w, atol=1e-3), name


def test_use_more_bits_is_llama_cpp_rule():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_q4_k_m_plan_on_a_576_wide_model():
    """SmolLM2-135M's widths: K-quants need rows of 256, so most of Q4_K_M falls back as llama.cpp's does."""
    plan = lambda name, shape: file_plan(name, shape, FILE_TYPES["Q4_K_M"], 30, tied=True).name  # noqa: E731
    assert plan("token_embd.weight", (49152, 576)) == "Q8_0"  # Q6_K, 576 % 256 != 0
    assert plan("blk.3.attn_q.weight", (576, 576)) == "Q5_0"  # Q4_K falls back
    assert plan("blk.0.attn_v.weight", (192, 576)) == "Q8_0"  # more bits: Q6_K, falls back
    assert plan("blk.0.ffn_down.weight", (576, 1536)) == "Q6_K"
    assert plan("blk.3.ffn_down.weight", (576, 1536)) == "Q4_K"
    assert plan("blk.3.attn_norm.weight", (576,)) == "F32"
    q4 = lambda name, shape: file_plan(name, shape, FILE_TYPES["Q4_0"], 30, tied=True).name  # noqa: E731
    assert (q4("token_embd.weight", (49152, 576)), q4("blk.1.ffn_up.weight", (1536, 576))) == ("Q8_0", "Q4_0")


# ---- whole models -----------------------------------------------------------------------------------------
def tiny(tok, dim=64, ffn=128, seed=0) -> Decoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=ffn,
                      max_seq_len=128, eos_token_id=tok.eos_token_id)
    model = Decoder(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    return model


def rtn(model, bits=4, symmetric=True, embed_bits=8):
    embedding = QScheme(embed_bits, 32, True) if embed_bits else None
    return quantize_(model, RTNConfig(QScheme(bits, 32, symmetric), search=False, embedding=embedding))


SEQ = torch.tensor([[1, 5, 9, 2, 7, 3, 8, 4, 6, 10, 11, 12]])


@pytest.mark.parametrize("bits, symmetric, expect", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0"),
                                                     (5, True, "Q5_0")])
@torch.no_grad()
def test_packed_model_exports_code_for_code(bits, symmetric, expect, tmp_path):
    tok = tiny_tokenizer()
    model = rtn(tiny(tok), bits, symmetric)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    _, infos, _ = read_header(path)
    types = {t.name: t.ggml_type for t in infos}
    assert types["blk.0.ffn_up.weight"] == TYPES[expect].id and types["token_embd.weight"] == TYPES["Q8_0"].id
    assert types["blk.0.attn_norm.weight"] == 0
    back = loader.load(path)
    assert torch.equal(back.model.blocks[1].mlp.down_proj.weight, model.blocks[1].mlp.down_proj.dequantize())
    assert torch.equal(back.model.blocks[0].attn.q_proj.weight, model.blocks[0].attn.q_proj.dequantize())
    assert (back.model(SEQ) - model(SEQ)).abs().max() < 1e-4


@torch.no_grad()
def test_float_model_quantized_on_export(tmp_path):
    tok = tiny_tokenizer()
    model = tiny(tok)
    expected = rtn(tiny(tok), 4)
    path = export_gguf(model, tok, tmp_path / "m.gguf", file_type="Q4_0")
    back = loader.load(path).model
    assert torch.equal(back.blocks[0].mlp.up_proj.weight, expected.blocks[0].mlp.up_proj.dequantize())
    assert torch.equal(back.embed.weight, expected.embed.dequantize())  # tied table: Q8_0 as llama.cpp stores it


def test_checkpoint_then_cli_export(tmp_path):
    tok = tiny_tokenizer()
    ckpt = save_checkpoint(rtn(tiny(tok), 4), tok, tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    assert main(["export", str(ckpt), "--format", "gguf", "-o", str(out)]) == 0
    assert {t.ggml_type for t in read_header(out)[1]} == {0, TYPES["Q4_0"].id, TYPES["Q8_0"].id}
    assert main(["export", str(ckpt), "--format", "gguf", "-o", str(out)]) == 2  # exists, no --force
    assert main(["export", str(ckpt), "--format", "gguf", "-o", str(out), "--force"]) == 0


def test_mismatched_request_is_refused_naming_the_fit(tmp_path, capsys):
    tok = tiny_tokenizer()
    ckpt = save_checkpoint(rtn(tiny(tok), 4), tok, tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    assert main(["export", str(ckpt), "--format", "gguf", "--type", "Q4_K_M", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GGUF stores as Q4_0" in err and "--type Q4_0" in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [ckpt]


def test_scheme_without_a_ggml_type_is_refused(tmp_path):
    tok = tiny_tokenizer()
    model = rtn(tiny(tok), 3, embed_bits=0)
    with pytest.raises(SlmError, match=r"int3 sym g32, which no GGUF type stores exactly.*int4 sym g32 = Q4_0"):
        export_gguf(model, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_type_is_a_parser_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["export", "x", "--format", "gguf", "--type", "Q3_K", "-o", str(tmp_path / "m.gguf")])
    assert exc.value.code == 2


# ---- llama.cpp reads what we wrote ------------------------------------------------------------------------
@pytest.mark.parametrize("file_type, packed", [("Q4_0", True), ("Q8_0", False), ("Q4_K_M", False),
                                               ("Q6_K", False)])
@torch.no_grad()
def test_llama_cpp_runs_our_quantized_files(file_type, packed, tmp_path):
    """llama.cpp's logits on our file match our decoder on the same (dequantized) weights; 256 wide so the
    K-quants are really used."""
    pytest.importorskip("llama_cpp")
    from slmkit.backends.llamacpp import load_gguf

    tok = tiny_tokenizer()
    model = tiny(tok, dim=256, ffn=512)
    model = rtn(model, 4) if packed else model
    path = export_gguf(model, tok, tmp_path / "m.gguf", file_type=file_type)
    kinds = {t.ggml_type for t in read_header(path)[1]}
    if file_type == "Q4_K_M":
        assert {TYPES["Q4_K"].id, TYPES["Q6_K"].id} <= kinds
    ours = loader.load(path).model(SEQ)
    theirs = load_gguf(path, threads=2, kv_float32=True).model(SEQ)
    rel = ((theirs - ours).norm() / ours.norm()).item()
    assert rel < 0.02, rel  # llama.cpp rounds activations to 8 bits for quantized matmuls
    assert np.isfinite(rel)


def test_our_reader_reads_back_every_type(tmp_path):
    tok = tiny_tokenizer()
    model = tiny(tok, dim=256, ffn=512)
    path = export_gguf(model, tok, tmp_path / "m.gguf", file_type="Q4_K_M")
    _, tensors = read_gguf(path)
    _, infos, _ = read_header(path)
    assert {t.name: t.ggml_type for t in infos}["blk.1.ffn_down.weight"] == TYPES["Q6_K"].id  # last of 2 layers
    for i, bound in ((0, 0.11), (1, 0.025)):  # Q4_K, Q6_K
        w = model.blocks[i].mlp.down_proj.weight
        assert ((tensors[f"blk.{i}.ffn_down.weight"] - w).norm() / w.norm()) < bound


def test_cli_hf_export_of_a_packed_checkpoint(tmp_path):
    """`slm export --format hf` writes packed weights as compressed-tensors; --type is GGUF's alone."""
    import json

    pytest.importorskip("compressed_tensors")
    tok = tiny_tokenizer()
    ckpt = save_checkpoint(rtn(tiny(tok), 4), tok, tmp_path / "ckpt")
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--format", "hf", "--type", "Q4_0", "-o", str(out)]) == 2
    assert main(["export", str(ckpt), "--format", "hf", "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


def test_float_hf_export_refuses_packed_weights(tmp_path):
    from slmkit.checkpoint import export_hf

    tok = tiny_tokenizer()
    with pytest.raises(SlmError, match="packed weights"):
        export_hf(rtn(tiny(tok), 4), tok, tmp_path / "hf")
