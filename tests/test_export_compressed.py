"""Hugging Face export of packed models in the compressed-tensors "pack-quantized" format: transformers (with the
compressed-tensors package) loads it to our packed model's logits, the file holds our codes packed in int32, and
the schemes the format cannot hold exactly are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from conftest import tokens  # noqa: E402
from test_quant_model import CFG, tiny_model  # noqa: E402

from slmkit.checkpoint import export_hf  # noqa: E402
from slmkit.errors import SlmError  # noqa: E402
from slmkit.quant import QScheme, RTNConfig, quantize_  # noqa: E402
from slmkit.quant.compressed_tensors import export_hf_compressed, pack_int32  # noqa: E402
from slmkit.quant.packed import QuantLinear  # noqa: E402

TOL = 1e-4
UNTIED = dataclasses.replace(CFG, tie_embeddings=False)
SHARED = dataclasses.replace(CFG, n_layers=4, share_blocks=2)  # 2 stored blocks, unrolled to 4 layers


def packed(scheme: QScheme, cfg=CFG, embedding: QScheme | None = QScheme(8, 32)):
    return quantize_(tiny_model(cfg=cfg), RTNConfig(scheme, search=False, embedding=embedding))


@torch.no_grad()
def transformers_logits(folder, ids: torch.Tensor, dequantize: bool = False) -> torch.Tensor:
    """Logits of transformers' model loaded from folder: decompressed on the first forward (the default) or,
    with dequantize, while loading."""
    extra = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager", **extra)
    return model.eval()(ids).logits


@torch.no_grad()
def assert_same_logits(model, folder, dequantize=False):
    ids = tokens(24)
    assert (transformers_logits(folder, ids, dequantize) - model(ids)).abs().max().item() < TOL


def block_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n.startswith("blocks.")}


def hf_name(name: str) -> str:
    """blocks.0.attn.q_proj -> model.layers.0.self_attn.q_proj (the tiny llama model's names)."""
    return name.replace("blocks.", "model.layers.").replace(".attn.", ".self_attn.")


# ---- transformers loads the export to our logits ---------------------------------------------------------
@pytest.mark.parametrize("scheme, cfg, dequantize", [
    (QScheme(4, 32), CFG, False), (QScheme(4, 32), CFG, True), (QScheme(4, 0), UNTIED, False),
    (QScheme(8, 0), CFG, True), (QScheme(8, 32), UNTIED, False), (QScheme(4, 32), SHARED, False)],
    ids=["int4-g32", "int4-g32-dequantize", "int4-channel-untied", "int8-channel-dequantize", "int8-g32-untied",
         "int4-g32-shared-blocks"])
def test_transformers_loads_the_export_with_our_logits(scheme, cfg, dequantize, tmp_path, tokenizer):
    model = packed(scheme, cfg)
    out = export_hf_compressed(model, tokenizer, tmp_path / "out")
    assert_same_logits(model, out, dequantize)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors reads our config as we mean it
    weights = parsed.config_groups["group_0"].weights
    assert (parsed.format, parsed.quant_method, parsed.ignore) == ("pack-quantized", "compressed-tensors", ["lm_head"])
    assert (weights.num_bits, weights.symmetric, weights.strategy) == (
        scheme.bits, True, "group" if scheme.group_size else "channel")
    assert weights.group_size == (scheme.group_size or None)


def test_float_linear_layers_are_listed_as_ignored(tmp_path, tokenizer):
    model = quantize_(tiny_model(), RTNConfig(QScheme(4, 32), search=False, embedding=None,
                                              layers=_skip_down_proj()))
    out = export_hf_compressed(model, tokenizer, tmp_path / "out")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert_same_logits(model, out)


def _skip_down_proj():
    from slmkit.modules import LayerFilter

    return LayerFilter(exclude=("*.down_proj",))


# ---- what the file holds -----------------------------------------------------------------------------
def test_file_holds_our_codes_packed_in_int32_with_negative_scales(tmp_path, tokenizer):
    model = packed(QScheme(4, 32), embedding=None)
    out = export_hf_compressed(model, tokenizer, tmp_path / "q4")
    tensors = load_file(out / "model.safetensors")
    for name, layer in block_layers(model).items():
        prefix = hf_name(name)
        words = tensors[f"{prefix}.weight_packed"]
        assert words.dtype == torch.int32 and words.shape == (layer.out_features, layer.in_features // 8)
        signed = unpack_from_int32(words, 4, (layer.out_features, layer.in_features))
        assert torch.equal(signed.to(torch.int16) + 8, layer.codes().to(torch.int16))
        assert torch.equal(tensors[f"{prefix}.weight_scale"], layer.scales.float())
        assert tensors[f"{prefix}.weight_shape"].tolist() == [layer.out_features, layer.in_features]
        assert f"{prefix}.weight_zero_point" not in tensors and f"{prefix}.weight" not in tensors
    scales = torch.cat([m.scales.flatten() for m in block_layers(model).values()])
    assert (scales < 0).any() and (scales > 0).any()  # llama.cpp's signed scales, which load exactly (above)

    float_size = (export_hf(tiny_model(), tokenizer, tmp_path / "float") / "model.safetensors").stat().st_size
    linear = sum(m.weight_numel for m in block_layers(model).values())
    saved = linear * (4 - 4 / 8 - 4 / 32)  # float32 weights -> 4-bit codes + a float32 scale per 32
    assert abs(float_size - (out / "model.safetensors").stat().st_size - saved) < 0.02 * saved


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors(bits):
    codes = torch.randint(0, 1 << bits, (6, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))  # 20 columns: a padded last word


# ---- asymmetric: exact with integer zero points, refused otherwise -------------------------------------
def integer_offsets_(model) -> None:
    """Give every asymmetric layer power-of-two scales and offsets = -scale * integer, which the format holds."""
    for layer in block_layers(model).values():
        scales = torch.exp2(torch.round(torch.log2(layer.scales.float())))
        zero = torch.randint(0, layer.scheme.qmax + 1, scales.shape, generator=torch.Generator().manual_seed(1))
        layer.scales, layer.offsets = scales.half(), (-scales * zero).half()


def test_asymmetric_with_integer_zero_points_is_exact(tmp_path, tokenizer):
    model = packed(QScheme(4, 32, symmetric=False))
    integer_offsets_(model)
    out = export_hf_compressed(model, tokenizer, tmp_path / "out")
    # Only load-time dequantization: transformers' default (compressed) load builds the zero points unpacked,
    # [out, groups] (compressed-tensors 0.20.1 packs them only for real tensors, not for its empty model), and
    # re-initializes them; llm-compressor's asymmetric checkpoints, laid out like ours (checked below), load so too.
    assert_same_logits(model, out, dequantize=True)
    tensors = load_file(out / "model.safetensors")
    layer = model.blocks[0].attn.q_proj
    zero = tensors["model.layers.0.self_attn.q_proj.weight_zero_point"]
    assert zero.dtype == torch.int32 and zero.shape == (layer.out_features // 8, layer.scales.shape[1])
    signed = unpack_from_int32(zero, 4, layer.scales.shape, packed_dim=0)
    assert torch.equal((signed.float() + 8) * -layer.scales.float(), layer.offsets.float())


def test_asymmetric_float_offsets_are_refused(tmp_path, tokenizer):
    model = packed(QScheme(4, 32, symmetric=False))
    with pytest.raises(SlmError, match="not -scale times an integer zero point"):
        export_hf_compressed(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_unsupported_bits_are_refused(bits, tmp_path, tokenizer):
    model = packed(QScheme(bits, 32), embedding=None)
    with pytest.raises(SlmError, match="supports int4 and int8"):
        export_hf_compressed(model, tokenizer, tmp_path / "out")


def test_float_models_activation_quantization_scaled_widths_and_existing_outputs_are_refused(tmp_path, tokenizer):
    with pytest.raises(SlmError, match="needs packed linear layers"):
        export_hf_compressed(tiny_model(), tokenizer, tmp_path / "float")
    model = packed(QScheme(8, 0), embedding=None)
    model.blocks[1].mlp.up_proj.act_bits = 8
    with pytest.raises(SlmError, match="SmoothQuant"):
        export_hf_compressed(model, tokenizer, tmp_path / "w8a8")
    model.blocks[1].mlp.up_proj.act_bits = 0
    scaled = packed(QScheme(4, 32), dataclasses.replace(CFG, layer_ffn_dims=(128, 96)), embedding=None)
    with pytest.raises(SlmError, match="layer-wise scaled widths"):
        export_hf_compressed(scaled, tokenizer, tmp_path / "scaled")
    (tmp_path / "out").mkdir()
    with pytest.raises(SlmError, match="exists"):
        export_hf_compressed(model, tokenizer, tmp_path / "out")
    assert (export_hf_compressed(model, tokenizer, tmp_path / "out", force=True) / "config.json").exists()
