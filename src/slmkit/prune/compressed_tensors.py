"""Hugging Face export of pruned float models in compressed-tensors' sparse formats, so the folder's size
reflects the zeros.

Two formats, as compressed-tensors defined them (its releases up to 0.12 read them: BitmaskCompressor and
Sparse24BitMaskCompressor; llm-compressor wrote them and vLLM ran 2:4 ones with its CUTLASS sparse kernels).
Every Linear layer of the blocks is written compressed; the embedding table, norms and output matrix stay float.

  sparse-bitmask     any pattern. `L.shape` int64 [2] (out, in); `L.compressed`, the nonzero weights in
                     row-major order, 1-d; `L.bitmask` uint8 [out, ceil(in / 8)], row r's nonzeros, bit k of
                     byte j marking column 8j + k; `L.row_offsets` int64 [out], where row r's values start.
  sparse-24-bitmask  2:4 only (at most 2 nonzeros in every 4 consecutive weights of a row; refused otherwise).
                     `L.shape`; `L.compressed` [out, in / 2], the 2 kept weights of each group of 4 (a group
                     with fewer nonzeros keeps a zero to make 2); `L.bitmask` as above, exactly 2 bits per group.

config.json's quantization_config holds the format under "sparsity_config", with the measured fraction of zero
weights in the compressed layers (`global_sparsity`) and the pattern ("2:4" where every layer has it,
"unstructured" otherwise). Both read back to exactly our weights.

The newest compressed-tensors releases (0.13 on) no longer read sparse formats, and neither does transformers
with them: use these folders with compressed-tensors <= 0.12 (or its loaders), and export_hf's dense folder
for transformers today. Our own checkpoint's sparse storage (slmkit.prune.storage) needs neither.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import convert
from ..checkpoint import block_linear_keys, float_hf_state, refuse_packed, write_hf_folder
from ..errors import require

_BITS = torch.arange(8, dtype=torch.uint8)


def pack_row_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols / 8)]: bit k of byte j of a row = mask[row, 8j + k]."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -cols % 8))  # [rows, bytes * 8]
    return (padded.view(rows, -1, 8) << _BITS).sum(-1, dtype=torch.uint8)  # [rows, bytes, 8] -> [rows, bytes]


def unpack_row_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols / 8)] -> bool [rows, cols]."""
    bits = (packed[..., None] >> _BITS) & 1  # [rows, bytes, 8]
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def bitmask_parts(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-bitmask parts of one matrix (see the module doc)."""
    keep = w != 0
    counts = keep.sum(1)
    return {"shape": torch.tensor(list(w.shape), dtype=torch.int64), "compressed": w[keep].contiguous(),
            "bitmask": pack_row_bits(keep), "row_offsets": torch.cumsum(counts, 0) - counts}


def is_two_four(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive weights of each row."""
    return w.shape[1] % 4 == 0 and bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def two_four_parts(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-24-bitmask parts of one 2:4 matrix: in each group of 4, its nonzeros and, where it has fewer
    than 2, its first zeros (top-2 of (nonzero, earlier) per group)."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // 4, 4)  # [rows, groups, 4]
    rank = (groups != 0).float() * 8 - torch.arange(4)  # nonzeros first, then earlier positions
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, rank.topk(2, dim=-1).indices, True)
    keep = keep.reshape(rows, cols)  # [rows, groups, 4] -> [rows, cols]
    return {"shape": torch.tensor([rows, cols], dtype=torch.int64),
            "compressed": w[keep].reshape(rows, cols // 2).contiguous(), "bitmask": pack_row_bits(keep)}


SPARSE_FORMATS = {"sparse-bitmask": bitmask_parts, "sparse-24-bitmask": two_four_parts}


def export_hf_sparse(model, tokenizer, out: Path, fmt: str = "sparse-bitmask", force: bool = False) -> Path:
    """A Hugging Face folder with every Linear layer of the blocks in compressed-tensors' sparse format `fmt`
    (SPARSE_FORMATS; see the module doc). Refuses packed (quantized) models and, for sparse-24-bitmask, any
    layer that is not 2:4."""
    require(fmt in SPARSE_FORMATS, f"unknown sparse format {fmt}; formats: {', '.join(SPARSE_FORMATS)}")
    refuse_packed(model)
    hf_state, cfg = float_hf_state(model)
    layers = block_linear_keys(model, cfg)
    two_four = all(is_two_four(hf_state[k]) for k in layers)
    require(two_four or fmt != "sparse-24-bitmask", "sparse-24-bitmask needs 2:4 sparsity in every Linear layer "
            "of the blocks (slm prune --pattern 2:4); use sparse-bitmask for other patterns")
    zeros = sum(int((hf_state[k] == 0).sum()) for k in layers) / sum(hf_state[k].numel() for k in layers)
    for key in layers:
        name = key[:-len(".weight")]
        hf_state.update({f"{name}.{part}": t for part, t in SPARSE_FORMATS[fmt](hf_state.pop(key)).items()})
    sparsity = {"format": fmt, "global_sparsity": zeros, "sparsity_structure": "2:4" if two_four else "unstructured",
                "targets": ["Linear"], "ignore": ["lm_head"]}
    qc = {"quant_method": "compressed-tensors", "sparsity_config": sparsity}  # no quantization: nothing else
    return write_hf_folder(out, hf_state, {**convert.config_to_hf(cfg), "quantization_config": qc}, tokenizer,
                           cfg, force)

