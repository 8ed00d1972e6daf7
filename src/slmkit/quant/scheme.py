"""Affine quantization math as pure tensor functions: parameters, codes, scale search, bit packing.

A scheme is (bits, group size, symmetric). Weights are quantized in groups of `group_size` consecutive input
columns of each output row (group_size 0: one group per row, i.e. per-channel); `per_tensor` functions treat
the whole tensor as one group. Codes are unsigned integers in [0, 2^bits - 1]:

  symmetric   w = scale * (q - 2^(bits-1))     llama.cpp's Q4_0 / Q8_0 grid for 4 / 8 bits
  asymmetric  w = scale * q + offset           llama.cpp's Q4_1 grid for 4 bits (offset = the group minimum)

Scales and offsets are rounded to float16 *before* codes are chosen, because that is how they are stored
(here and in GGUF): the codes are the best ones for the scale the file will really hold. The symmetric scale
follows llama.cpp: the group's largest-magnitude value maps exactly onto the extreme code -2^(bits-1), which
uses all 2^bits levels (the scale may be negative).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from ..errors import require


@dataclass(frozen=True)
class QScheme:
    bits: int = 4
    group_size: int = 32  # input columns per scale; 0 = per output channel
    symmetric: bool = True

    def validate(self, in_features: int | None = None) -> "QScheme":
        require(isinstance(self.bits, int) and 2 <= self.bits <= 8, f"bits must be 2..8, got {self.bits}")
        require(self.group_size >= 0, f"group size must be >= 0 (0 = per channel), got {self.group_size}")
        if in_features is not None and self.group_size:
            require(in_features % self.group_size == 0,
                    f"group size {self.group_size} does not divide the layer width {in_features}")
        return self

    def width(self, in_features: int) -> int:
        """Columns per group for a layer `in_features` wide."""
        return self.group_size or in_features

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        """The code of zero in the symmetric grid."""
        return 1 << (self.bits - 1)

    def describe(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {group}"


@dataclass(frozen=True)
class LayerScheme:
    """One entry of a per-layer scheme map (mixed precision): layers whose qualified name matches the glob
    `pattern` take `scheme` instead of the step's own."""
    pattern: str
    scheme: QScheme


def scheme_for(name: str, base: QScheme, overrides: tuple[LayerScheme, ...] = ()) -> QScheme:
    """The scheme of layer `name`: the first override whose pattern matches, else `base`."""
    return next((o.scheme for o in overrides if fnmatchcase(name, o.pattern)), base)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def grouped(w: torch.Tensor, width: int) -> torch.Tensor:
    """[out, in] -> [out, in / width, width]."""
    return w.reshape(w.shape[0], -1, width)


def ungrouped(g: torch.Tensor) -> torch.Tensor:
    """[out, groups, width] -> [out, groups * width]."""
    return g.reshape(g.shape[0], -1)


def qparams(g: torch.Tensor, scheme: QScheme, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and offset, asymmetric) of each group of g [..., width] -> [..., 1] each, float16-rounded.

    `clip` (scalar or [..., 1]) shrinks the range the grid covers; values beyond it saturate."""
    if scheme.symmetric:
        idx = g.abs().argmax(-1, keepdim=True)
        peak = g.gather(-1, idx)  # [..., 1], signed
        scale = fp16_round(peak * clip / -scheme.mid)
        return torch.where(scale == 0, torch.ones_like(scale), scale), None
    lo, hi = g.amin(-1, keepdim=True) * clip, g.amax(-1, keepdim=True) * clip
    scale = fp16_round((hi - lo) / scheme.qmax)
    return torch.where(scale == 0, torch.ones_like(scale), scale), fp16_round(lo)


def quantize(g: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: QScheme) -> torch.Tensor:
    """Codes (uint8) of g under the given parameters (broadcast over the last dim)."""
    q = torch.round(g / scale) + scheme.mid if offset is None else torch.round((g - offset) / scale)
    return q.clamp_(0, scheme.qmax).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: QScheme) -> torch.Tensor:
    """Values (float32) of codes q under the given parameters."""
    if offset is None:
        return scale * (q.float() - scheme.mid)
    return scale * q.float() + offset


def fake_quantize(g: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: QScheme) -> torch.Tensor:
    return dequantize(quantize(g, scale, offset, scheme), scale, offset, scheme)


def search_qparams(g: torch.Tensor, scheme: QScheme, importance: torch.Tensor | None = None, steps: int = 28,
                   min_clip: float = 0.3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group parameters minimising sum(importance * (g - dequant)^2) over clip ratios 1 .. min_clip.

    importance [width] or broadcastable to g (an imatrix: mean squared activation of each input column);
    None weighs every column equally (plain MSE). clip = 1 is round-to-nearest, so the search never loses."""
    weight = torch.ones_like(g) if importance is None else importance.expand_as(g)
    best_scale, best_offset = qparams(g, scheme)
    best_err = _error(g, best_scale, best_offset, scheme, weight)
    for clip in torch.linspace(1.0, min_clip, steps + 1)[1:].tolist():
        scale, offset = qparams(g, scheme, clip)
        err = _error(g, scale, offset, scheme, weight)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if offset is not None:
            best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def _error(g, scale, offset, scheme, weight) -> torch.Tensor:
    return (weight * (g - fake_quantize(g, scale, offset, scheme)) ** 2).sum(-1, keepdim=True)


def quantize_weight(w: torch.Tensor, scheme: QScheme, importance: torch.Tensor | None = None,
                    search: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest of w [out, in]: codes [out, in] uint8, scales and offsets [out, groups] float32."""
    g = grouped(w.float(), scheme.width(w.shape[1]))  # [out, groups, width]
    imp = None if importance is None else grouped(importance.float()[None], scheme.width(w.shape[1]))
    scale, offset = search_qparams(g, scheme, imp) if search else qparams(g, scheme)
    codes = ungrouped(quantize(g, scale, offset, scheme))
    return codes, scale[..., 0], None if offset is None else offset[..., 0]


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                      scheme: QScheme) -> torch.Tensor:
    """codes [out, in], scale/offset [out, groups] -> float32 [out, in]."""
    g = grouped(codes, codes.shape[1] // scale.shape[1])  # [out, groups, width]
    return ungrouped(dequantize(g, scale.float()[..., None], None if offset is None else offset.float()[..., None],
                                scheme))


def quantize_per_tensor(w: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One scale (and offset) for the whole tensor: codes shaped like w, scale/offset [1]."""
    flat = w.float().reshape(1, -1)  # [1, numel]
    scale, offset = qparams(flat, scheme)
    codes = quantize(flat, scale, offset, scheme).reshape(w.shape)
    return codes, scale.reshape(1), None if offset is None else offset.reshape(1)


# ---- packing: 8-bit one code per byte, 4-bit two, 2-bit four; 3, 5, 6 and 7 bits as a bit stream --------------
LANES = {8: 1, 4: 2, 2: 4}  # codes per byte where a byte holds whole codes
STREAM = 8  # other widths: every 8 codes fill `bits` bytes exactly


def packed_width(width: int, bits: int) -> int:
    """Bytes that `width` codes of `bits` bits take: exactly width * bits / 8."""
    unit = LANES.get(bits, STREAM)
    require(width % unit == 0, f"width {width} is not a multiple of {unit} for {bits}-bit packing")
    return width * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] -> uint8 [..., n * bits / 8]. Whole-code layouts: column j*per + k sits at bit
    k * 8/per of byte j (4-bit: low nibble first). Stream layout (3, 5, 6, 7 bits): each run of 8 codes is one
    little-endian integer of `bits` bytes, code k at bit k * bits."""
    packed_width(codes.shape[-1], bits)  # validates the width
    if bits not in LANES:
        return _pack_stream(codes, bits)
    per = LANES[bits]
    if per == 1:
        return codes.to(torch.uint8).contiguous()
    shift = 8 // per
    lanes = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)  # [..., n/per, per]
    packed = torch.zeros(lanes.shape[:-1], dtype=torch.uint8)
    for k in range(per):
        packed |= lanes[..., k] << (k * shift)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack: uint8 [..., n * bits / 8] -> uint8 codes [..., n]."""
    if bits not in LANES:
        return _unpack_stream(packed, bits)
    per = LANES[bits]
    if per == 1:
        return packed
    shift, mask = 8 // per, (1 << (8 // per)) - 1
    lanes = torch.stack([(packed >> (k * shift)) & mask for k in range(per)], -1)  # [..., n/per, per]
    return lanes.reshape(*packed.shape[:-1], -1)


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    runs = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, STREAM)  # [..., n/8, 8]
    word = (runs << (torch.arange(STREAM) * bits)).sum(-1, keepdim=True)  # [..., n/8, 1], < 2^(8*bits)
    return word.view(torch.uint8)[..., :bits].reshape(*codes.shape[:-1], -1)  # low `bits` bytes of each word


def _unpack_stream(packed: torch.Tensor, bits: int) -> torch.Tensor:
    runs = packed.reshape(*packed.shape[:-1], -1, bits)  # [..., n/8, bits]
    padded = torch.zeros(*runs.shape[:-1], 8, dtype=torch.uint8)
    padded[..., :bits] = runs
    word = padded.view(torch.int64)  # [..., n/8, 1]
    codes = (word >> (torch.arange(STREAM) * bits)) & ((1 << bits) - 1)  # [..., n/8, 8]
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], -1)
