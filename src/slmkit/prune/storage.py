"""Compressed storage of sparse float matrices in slmkit checkpoints, so the file size reflects the zeros.

A matrix stored sparse becomes two tensors: `<name>.sparse_mask`, a bitmask of its nonzero entries (row-major,
8 per byte, least significant bit first, uint8 [ceil(numel / 8)]), and `<name>.sparse_values`, the nonzero
entries in row-major order, in the matrix's dtype. slmkit.json lists the sparse matrices with their shapes
under "sparse"; loading rebuilds the dense matrix exactly (a stored -0.0 comes back as 0.0).

The same encoding serves N:M patterns: a 2:4 group's mask takes 4 bits, as its two 2-bit indices would, and
a 4:8 group's 8 bits beat four 3-bit indices. A matrix is stored sparse only where that is smaller than dense
(fp32: above ~3% zeros). Memory and speed are unchanged: the model runs on the dense matrices it loads.
"""

from __future__ import annotations

import math

import torch

from ..errors import require

MASK, VALUES = ".sparse_mask", ".sparse_values"
_BITS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n / 8)], bit i of byte k = mask[8k + i]."""
    padded = torch.zeros(math.ceil(mask.numel() / 8) * 8, dtype=torch.uint8)
    padded[:mask.numel()] = mask.reshape(-1)
    return (padded.view(-1, 8) << _BITS).sum(1, dtype=torch.uint8)  # [bytes, 8] -> [bytes]


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n / 8)] -> bool [n]."""
    return ((packed[:, None] >> _BITS) & 1).reshape(-1)[:n].bool()  # [bytes, 8] -> [n]


def sparse_bytes(t: torch.Tensor, nonzeros: int) -> int:
    return nonzeros * t.element_size() + math.ceil(t.numel() / 8)


def compress_state(state: dict[str, torch.Tensor], names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The state with each named matrix whose zeros make it smaller stored as mask + values, and the layout
    {name: shape} slmkit.json keeps for loading."""
    state, layout = dict(state), {}
    for name in names:
        t = state[name]
        keep = t != 0
        if sparse_bytes(t, int(keep.sum())) >= t.numel() * t.element_size():
            continue
        del state[name]
        state[name + MASK], state[name + VALUES] = pack_bits(keep), t[keep].contiguous()
        layout[name] = list(t.shape)
    return state, layout


def expand_state_(tensors: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    """Rebuild, in place, the dense matrices `layout` ({name: shape}) lists from their masks and values."""
    for name, shape in layout.items():
        require(name + MASK in tensors and name + VALUES in tensors, f"{name}: sparse mask or values missing")
        mask, values = tensors.pop(name + MASK), tensors.pop(name + VALUES)
        dense = torch.zeros(math.prod(shape), dtype=values.dtype)
        keep = unpack_bits(mask, dense.numel())
        require(int(keep.sum()) == values.numel(), f"{name}: the sparse mask and values disagree")
        dense[keep] = values
        tensors[name] = dense.reshape(shape)
    return tensors
