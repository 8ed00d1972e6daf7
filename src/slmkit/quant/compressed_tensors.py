"""Hugging Face export of packed models in the compressed-tensors "pack-quantized" format (llm-compressor's).

transformers loads such a folder when the `compressed-tensors` package is installed (pip install
'slmkit[hf-quant]'), and vLLM serves it with its W4A16 / W8A16 kernels. The packed linear layers of the blocks
are written as they are, with no requantization:

  weight_packed      int32 [out, in * bits / 32]: 32 / bits codes per word, column k of each word at bit k * bits,
                     each stored as (signed value + 2^(bits-1)): for a symmetric scheme that is our code itself
  weight_scale       float32 [out, groups] (per channel: [out, 1]): our float16 scales, exactly, negative ones
                     included (llama.cpp's convention: a negative scale times a signed value is plain arithmetic).
                     float32 like the rest of the export (config.json's dtype): transformers' load-time
                     dequantization computes in the scale's dtype, and float16 would round the weights
  weight_zero_point  asymmetric only, int32 [out * bits / 32, groups]: the integer zero points, packed along the
                     output rows the same way
  weight_shape       int64 [2]: (out, in)

Each reads back as scale * (signed value - zero point): exactly our scale * (code - 2^(bits-1)) for a symmetric
scheme. An asymmetric scheme stores a float16 offset (value = scale * code + offset), which the format can hold
only where offset = -scale * z for an integer z in [0, 2^bits - 1]; any other offset is refused (SlmError)
rather than silently requantized. The format's kernels take 4 and 8 bits; other widths are refused.
transformers (5.x with compressed-tensors 0.20) loads asymmetric folders only with load-time dequantization,
from_pretrained(..., quantization_config=CompressedTensorsConfig(dequantize=True)): its default, compressed load
shapes the packed zero points wrongly, for llm-compressor's asymmetric checkpoints as for ours.

Everything else is written as float, as export_hf writes it: embeddings, norms, biases, linear layers left float
(listed under `ignore`), and the output matrix. A packed embedding table or output matrix (RTN's Q8 tables) is
dequantized to float32: those tables stay exact but lose their compression in this format, whose inference
engines quantize only Linear layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import convert
from ..checkpoint import block_linear_keys, write_hf_folder
from ..errors import SlmError, require
from .packed import PackedWeight, QuantLinear, state_with_packed_as
from .scheme import QScheme

SUPPORTED_BITS = (4, 8)
_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def export_hf_compressed(model, tokenizer, out: Path, force: bool = False) -> Path:
    """A Hugging Face folder (config.json with a compressed-tensors quantization_config, model.safetensors,
    tokenizer) holding the model's packed linear layers in the "pack-quantized" format; see the module doc."""
    scheme = _block_scheme(model)
    state, cfg = convert.unroll_for_export(_compressed_state(model), _uniform_cfg(model.cfg))
    hf_state = {**convert.state_to_hf(state, cfg), **_compressed_to_hf(state, cfg)}
    quantized = sorted(k[:-len(".weight_packed")] for k in hf_state if k.endswith(".weight_packed"))
    ignore = _float_linears(model, cfg, quantized)
    hf_config = {**convert.config_to_hf(cfg), "quantization_config": quantization_config(scheme, ignore)}
    return write_hf_folder(Path(out), hf_state, hf_config, tokenizer, cfg, force)


def quantization_config(scheme: QScheme, ignore: list[str]) -> dict:
    """config.json's "quantization_config": one group of weight-only int quantization for every Linear layer
    not in `ignore` (module names in transformers' model, e.g. "lm_head")."""
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "dynamic": False,
               "group_size": scheme.group_size or None, "strategy": "group" if scheme.group_size else "channel"}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": None}


# ---- which layers, and whether the format can hold them --------------------------------------------------
def _block_linears(model) -> dict[str, QuantLinear]:
    """{slmkit name: module} of the packed linear layers inside the blocks."""
    return {n: m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, QuantLinear)}


def _block_scheme(model) -> QScheme:
    """The one scheme of the blocks' packed layers, refused (SlmError) where the format cannot hold it."""
    layers = _block_linears(model)
    require(layers, "compressed-tensors export needs packed linear layers in the blocks; this model has none "
                    "(a float model exports with export_hf)")
    schemes = {m.scheme for m in layers.values()}
    require(len(schemes) == 1, "compressed-tensors export needs one scheme for all packed layers, got "
            + ", ".join(sorted(s.describe() for s in schemes)))
    scheme = schemes.pop()
    require(scheme.bits in SUPPORTED_BITS, f"compressed-tensors export supports int4 and int8 weights "
            f"(symmetric, or asymmetric with integer zero points; per channel or grouped); got {scheme.describe()}")
    require(not any(m.act_bits for m in layers.values()),
            "compressed-tensors export of quantized activations (SmoothQuant W8A8) is not supported")
    return scheme


def _uniform_cfg(cfg):
    """cfg itself, if its layers need no padding to export (padding would have to re-pack the codes)."""
    padded = cfg.layer_n_heads or cfg.layer_n_kv_heads or cfg.layer_ffn_dims or cfg.dim % cfg.n_heads
    require(not padded, "compressed-tensors export of layer-wise scaled widths is not supported "
                        "(transformers needs uniform layers, and padding would re-pack the codes)")
    return cfg


def _float_linears(model, cfg, quantized: list[str]) -> list[str]:
    """transformers' names of the Linear layers written as float: the output matrix and unquantized ones."""
    names = [k[:-len(".weight")] for k in block_linear_keys(model, cfg)]
    return ["lm_head"] + [n for n in names if n not in quantized]


# ---- tensors ------------------------------------------------------------------------------------------
def _compressed_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict with each block's packed layer in compressed-tensors parts (name.weight_packed,
    ...) and every other packed table (embedding, output matrix) dequantized to name.weight."""
    blocks = _block_linears(model)
    return state_with_packed_as(model, lambda name, m: compress(m) if name in blocks else {"weight": m.dequantize()})


def _compressed_to_hf(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The compressed parts under transformers' names: each part renamed the way its layer's weight is."""
    out = {}
    for part in _PARTS:
        as_weight = {k[:-len(part)] + "weight": v for k, v in state.items() if k.endswith("." + part)}
        out.update({k[:-len("weight")] + part: v for k, v in convert.state_to_hf(as_weight, cfg).items()})
    return out


def compress(layer: PackedWeight) -> dict[str, torch.Tensor]:
    """One packed layer's compressed-tensors parts (see the module doc), holding exactly its codes."""
    scheme = layer.scheme
    parts = {"weight_packed": pack_int32(layer.codes(), scheme.bits),
             "weight_scale": layer.scales.float().contiguous(),  # [out, groups], exact
             "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if layer.offsets is not None:
        zero = integer_zero_points(layer.scales, layer.offsets, scheme)  # [out, groups]
        parts["weight_zero_point"] = pack_int32(zero.T, scheme.bits).T.contiguous()  # [out * bits / 32, groups]
    return parts


def integer_zero_points(scales: torch.Tensor, offsets: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """z [out, groups] (codes 0..2^bits - 1, uint8) with offsets == -scales * z exactly; SlmError if none is.

    Our offsets are free float16 values (the group minimum); compressed-tensors stores integer zero points."""
    z = -offsets.double() / scales.double()
    exact = (z == z.round()) & (z >= 0) & (z <= scheme.qmax)
    if not bool(exact.all()):
        raise SlmError(f"compressed-tensors cannot hold this {scheme.describe()} model exactly: its float offsets "
                       f"are not -scale times an integer zero point ({int((~exact).sum())} of {exact.numel()} "
                       f"groups); quantize symmetrically for this export")
    return z.to(torch.uint8)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] -> int32 [rows, ceil(cols * bits / 32)]: column j * per + k at bit k * bits of
    word j (per = 32 / bits; bits must divide 32), the last word padded with zero codes."""
    require(32 % bits == 0, f"int32 packing needs bits dividing 32, got {bits}")
    per = 32 // bits
    rows, cols = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, -cols % per))  # [rows, words * per]
    lanes = padded.reshape(rows, -1, per)  # [rows, words, per]
    shifts = torch.arange(per, dtype=torch.int64) * bits  # [per]
    words = (lanes << shifts).sum(-1)  # [rows, words], 0 .. 2^32 - 1
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
