"""Hugging Face export of pruned models in compressed-tensors' sparse formats: the bit layout, exact round trips,
the format's own reader (compressed-tensors 0.12, the last release that reads sparse formats, installed beside
the test environment by the README's test command) decompressing our folders to our weights, transformers
running those weights to our logits, the file shrinking with the zeros, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tokens
from test_cli import run
from test_quant_model import tiny_model

from slmkit.checkpoint import export_hf, save_checkpoint
from slmkit.export import export_model
from slmkit.errors import SlmError
from slmkit.prune import PruneConfig, prune_
from slmkit.prune.compressed_tensors import (bitmask_parts, export_hf_sparse, is_two_four, pack_row_bits,
                                             two_four_parts, unpack_row_bits)
from slmkit.quant import QScheme, RTNConfig, quantize_

# compressed-tensors 0.12.2, installed with pip install --no-deps --target "$VIRTUAL_ENV/compressed-tensors-0.12"
LEGACY_CT = Path(os.environ.get("SLMKIT_CT_LEGACY", Path(sys.prefix) / "compressed-tensors-0.12"))


def pruned(pattern=None, seed=0):
    return prune_(tiny_model(seed=seed), PruneConfig("magnitude", sparsity=None if pattern else 0.5, pattern=pattern))


def decode_parts(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our reading of one layer's parts, for the round-trip tests (the format's own reader is tested below)."""
    rows, cols = parts["shape"].tolist()
    keep = unpack_row_bits(parts["bitmask"], cols)
    dense = torch.zeros(rows, cols, dtype=parts["compressed"].dtype)
    dense[keep] = parts["compressed"].flatten()
    return dense


# ---- the math -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cols", [8, 13, 64])
def test_row_bits_are_little_endian_per_row_and_round_trip(cols):
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) < 0.4
    packed = pack_row_bits(mask)
    assert packed.shape == (5, (cols + 7) // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_row_bits(packed, cols), mask)
    one = torch.zeros(1, cols, dtype=torch.bool)
    one[0, cols - 1] = True
    assert pack_row_bits(one)[0, -1].item() == 1 << ((cols - 1) % 8)


def test_bitmask_parts_hold_exactly_the_nonzeros_with_row_offsets():
    w = torch.randn(6, 20) * (torch.rand(6, 20) < 0.3)
    w[2] = 0.0  # an empty row
    parts = bitmask_parts(w)
    assert torch.equal(decode_parts(parts), w) and parts["compressed"].numel() == int((w != 0).sum())
    counts = (w != 0).sum(1)
    assert parts["row_offsets"].tolist() == [int(counts[:r].sum()) for r in range(6)]


def test_two_four_parts_keep_two_of_every_four_even_where_fewer_are_nonzero():
    w = pruned(pattern=(2, 4)).blocks[0].mlp.up_proj.weight.detach().clone()
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # one nonzero: a zero is kept beside it
    w[1, :4] = 0.0
    assert is_two_four(w) and not is_two_four(torch.ones(4, 8))
    parts = two_four_parts(w)
    bits = unpack_row_bits(parts["bitmask"], w.shape[1])
    assert parts["compressed"].shape == (w.shape[0], w.shape[1] // 2)
    assert (bits.reshape(w.shape[0], -1, 4).sum(-1) == 2).all() and torch.equal(decode_parts(parts), w)


# ---- whole folders --------------------------------------------------------------------------------------
def folder_weights(folder: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Dense weights of a sparse folder, decoded with our own reader."""
    state = load_file(folder / "model.safetensors")
    names = {k.rsplit(".", 1)[0] for k in state if k.endswith(".bitmask")}
    for name in names:
        parts = {p: state.pop(f"{name}.{p}") for p in ("shape", "compressed", "bitmask", "row_offsets")
                 if f"{name}.{p}" in state}
        assert ("row_offsets" in parts) == (fmt == "sparse-bitmask")
        state[f"{name}.weight"] = decode_parts(parts)
    return state


@pytest.mark.parametrize("pattern, fmt", [(None, "sparse-bitmask"), ((2, 4), "sparse-bitmask"),
                                          ((2, 4), "sparse-24-bitmask")])
def test_sparse_folder_holds_exactly_the_dense_weights_and_is_smaller(pattern, fmt, tmp_path, tokenizer):
    model = pruned(pattern)
    dense = export_hf(model, tokenizer, tmp_path / "dense")
    sparse = export_hf_sparse(model, tokenizer, tmp_path / "sparse", fmt)
    want = load_file(dense / "model.safetensors")
    got = folder_weights(sparse, fmt)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    qc = json.loads((sparse / "config.json").read_text())["quantization_config"]
    sc = qc["sparsity_config"]
    assert (sc["format"], sc["sparsity_structure"]) == (fmt, "2:4" if pattern else "unstructured")
    assert abs(sc["global_sparsity"] - 0.5) < 0.01
    layers = sum(1 for k in load_file(sparse / "model.safetensors") if k.endswith(".bitmask"))
    assert layers == 7 * model.cfg.n_layers  # every Linear of every block
    linear_bytes = sum(v.numel() * 4 for k, v in want.items() if k.endswith("_proj.weight"))
    saved = (dense / "model.safetensors").stat().st_size - (sparse / "model.safetensors").stat().st_size
    assert saved > 0.4 * linear_bytes  # half the values gone, one bit per weight added: 15/32 of 4 bytes


def test_refusals_name_the_way_out(tmp_path, tokenizer):
    with pytest.raises(SlmError, match="needs 2:4 sparsity.*use sparse-bitmask"):
        export_hf_sparse(pruned(), tokenizer, tmp_path / "a", "sparse-24-bitmask")
    packed = quantize_(tiny_model(), RTNConfig(QScheme(4, 32), search=False))
    with pytest.raises(SlmError, match="packed weights"):
        export_hf_sparse(packed, tokenizer, tmp_path / "b")
    with pytest.raises(SlmError, match="is a GGUF type.*sparse-bitmask"):
        export_model(pruned(), tokenizer, tmp_path / "c", "hf", "Q4_0")
    assert not any(tmp_path.iterdir())


def test_slm_export_writes_the_sparse_format(tmp_path, tokenizer, capsys):
    ckpt = save_checkpoint(pruned((2, 4)), tokenizer, tmp_path / "ckpt")
    code, out, _ = run(capsys, "export", str(ckpt), "--format", "hf", "--type", "sparse-24-bitmask",
                       "-o", str(tmp_path / "hf"))
    assert code == 0 and Path(out.strip()) == tmp_path / "hf"
    assert json.loads((tmp_path / "hf/config.json").read_text())["quantization_config"]["sparsity_config"][
        "format"] == "sparse-24-bitmask"
    code, _, err = run(capsys, "export", str(ckpt), "--format", "hf", "--type", "sparse-24-bitmask",
                       "-o", str(tmp_path / "hf"))
    assert code == 2 and "exists" in err


# ---- the format's own reader, and transformers on what it reads ------------------------------------------
READER = r"""
import json, sys
from safetensors.torch import save_file
from compressed_tensors.compressors import ModelCompressor
folder, out = sys.argv[1:]
qc = json.load(open(folder + "/config.json"))["quantization_config"]
compressor = ModelCompressor.from_compression_config(qc).sparsity_compressor
print(type(compressor).__name__)
save_file({k: v.contiguous() for k, v in compressor.decompress(folder)}, out)
"""


@pytest.mark.skipif(not (LEGACY_CT / "compressed_tensors").is_dir(),
                    reason=f"compressed-tensors 0.12 not installed at {LEGACY_CT} (see the README's test command)")
@pytest.mark.parametrize("pattern, fmt, compressor", [(None, "sparse-bitmask", "BitmaskCompressor"),
                                                      ((2, 4), "sparse-24-bitmask", "Sparse24BitMaskCompressor")])
def test_compressed_tensors_reads_our_folder_to_our_weights_and_logits(pattern, fmt, compressor, tmp_path,
                                                                      tokenizer):
    transformers = pytest.importorskip("transformers")
    model = pruned(pattern)
    folder = export_hf_sparse(model, tokenizer, tmp_path / "sparse", fmt)
    env = {**os.environ, "PYTHONPATH": str(LEGACY_CT)}
    done = subprocess.run([sys.executable, "-c", READER, str(folder), str(tmp_path / "read.safetensors")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == compressor
    read = load_file(tmp_path / "read.safetensors")
    want = load_file(export_hf(model, tokenizer, tmp_path / "dense") / "model.safetensors")
    assert sorted(read) == sorted(want) and all(torch.equal(read[k], want[k]) for k in want)
    save_file(read, str(tmp_path / "dense/model.safetensors"))  # transformers on exactly what the reader read
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = tokens(24)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
