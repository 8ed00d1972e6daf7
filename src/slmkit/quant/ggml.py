"""GGML block formats for GGUF export: our codes written as they are, float matrices quantized as llama.cpp does.

Two ways into a GGUF block type:

* **Exact** (`encode_codes`): a packed weight whose scheme *is* a GGML block grid is written code for code, with
  its float16 scales and offsets. The table `EXACT` lists them: 8-bit symmetric groups of 32 are Q8_0, 4-bit
  symmetric Q4_0, 4-bit asymmetric Q4_1, 5-bit symmetric Q5_0 and asymmetric Q5_1. Our symmetric scale is
  llama.cpp's (signed peak / -mid), so what GPTQ or AWQ chose is what llama.cpp reads.
* **From float** (`encode_float`): a float matrix is quantized to the requested type: the exact grids by
  plain round-to-nearest (slmkit's `quantize_weight`, no search, as llama.cpp's reference quantizers), the
  K-quants (Q4_K, Q6_K: super-blocks of 256 with 6- or 8-bit sub-block scales) by `q4_k_blocks` /
  `q6_k_blocks` below.

`file_plan` gives each tensor its type for a requested file type, following llama.cpp's rules (its
`llama_tensor_get_type`): the output / tied embedding table in Q6_K, Q4_K_M's extra bits for attn_v and
ffn_down in the first and last eighth of the layers and every third between, and the fall-backs for widths
that are not a multiple of 256 (Q4_K -> Q5_0, Q6_K -> Q8_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SlmError, require
from .scheme import QScheme, fp16_round, quantize_weight


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int  # gguf.GGMLQuantizationType value
    block: int  # elements per block
    nbytes: int  # bytes per block
    scheme: QScheme | None = None  # the slmkit scheme stored exactly (None: float or K-quant)


TYPES = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2),
    GGMLType("Q8_0", 8, 32, 34, QScheme(8, 32, True)),
    GGMLType("Q4_0", 2, 32, 18, QScheme(4, 32, True)), GGMLType("Q4_1", 3, 32, 20, QScheme(4, 32, False)),
    GGMLType("Q5_0", 6, 32, 22, QScheme(5, 32, True)), GGMLType("Q5_1", 7, 32, 24, QScheme(5, 32, False)),
    GGMLType("Q4_K", 12, 256, 144), GGMLType("Q6_K", 14, 256, 210))}
EXACT = {t.scheme: t for t in TYPES.values() if t.scheme is not None}


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type: its general.file_type id, the type of most matrices, and Q4_K_M's extra bits."""
    name: str
    id: int  # llama_ftype
    main: str
    more_bits: str | None = None  # type of attn_v / ffn_down in the layers use_more_bits picks


FILE_TYPES = {f.name: f for f in (
    FileType("F32", 0, "F32"), FileType("F16", 1, "F16"), FileType("Q8_0", 7, "Q8_0"),
    FileType("Q4_0", 2, "Q4_0"), FileType("Q4_1", 3, "Q4_1"), FileType("Q5_0", 8, "Q5_0"),
    FileType("Q5_1", 9, "Q5_1"), FileType("Q6_K", 18, "Q6_K"), FileType("Q4_K_M", 15, "Q4_K", "Q6_K"))}
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's choice when the row width is not a multiple of 256
MORE_BITS_ROLES = ("attn_v.weight", "ffn_down.weight")  # GGUF tensor names Q4_K_M gives more bits to
OUTPUT_ROLES = ("output.weight",)  # the output matrix: Q6_K unless the file is F32/F16/Q8_0


def file_type(name: str) -> FileType:
    require(name in FILE_TYPES, f"cannot write GGUF type {name}; types: {', '.join(FILE_TYPES)}")
    return FILE_TYPES[name]


def exact_type(scheme: QScheme) -> GGMLType | None:
    return EXACT.get(scheme)


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's pick for Q4_K_M: the first and last eighth of the layers and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def file_plan(name: str, shape: tuple[int, ...], ftype: FileType, n_layers: int, tied: bool) -> GGMLType:
    """The GGML type of GGUF tensor `name` (shape [rows, width]) in a file of type ftype."""
    if len(shape) < 2 or ftype.main == "F32":
        return TYPES["F32"]
    want = ftype.main
    is_output = name in OUTPUT_ROLES or (tied and name == "token_embd.weight")
    if is_output and ftype.main not in ("F16", "Q8_0"):
        want = "Q6_K"
    elif ftype.more_bits and name.endswith(MORE_BITS_ROLES):
        want = ftype.more_bits if use_more_bits(int(name.split(".")[1]), n_layers) else want
    if shape[-1] % TYPES[want].block:
        want = FALLBACK.get(want, want)
    require(shape[-1] % TYPES[want].block == 0, f"{name}: width {shape[-1]} is not a multiple of {want}'s "
            f"block of {TYPES[want].block}")
    return TYPES[want]


# ---- encoding: [rows, width] -> uint8 [rows, width / block * nbytes] --------------------------------------
def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float [..., n] -> uint8 [..., 2n] (little-endian float16)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes [..., 32] -> [..., 16] bytes: low nibble element j, high nibble element j + 16."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """codes [..., 32] -> [..., 4] bytes: a little-endian uint32 whose bit j is bit 4 of element j."""
    word = (((q.to(torch.int64) >> 4) & 1) << torch.arange(32)).sum(-1, keepdim=True)  # [..., 1]
    return word.view(torch.uint8)[..., :4]  # int64 -> 8 little-endian bytes, the low 4 hold the word


def encode_codes(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 gtype: GGMLType) -> torch.Tensor:
    """Codes [rows, width] uint8 with float16 scales/offsets [rows, width / 32] -> GGML blocks of gtype."""
    require(gtype.scheme is not None, f"{gtype.name} does not store slmkit codes exactly")
    rows = codes.shape[0]
    q = codes.reshape(rows, -1, 32)  # [rows, blocks, 32]
    d = _f16_bytes(scales.reshape(rows, -1, 1))  # [rows, blocks, 2]
    m = None if offsets is None else _f16_bytes(offsets.reshape(rows, -1, 1))
    parts = {"Q8_0": lambda: [d, (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)],
             "Q4_0": lambda: [d, _nibbles(q)], "Q4_1": lambda: [d, m, _nibbles(q)],
             "Q5_0": lambda: [d, _fifth_bits(q), _nibbles(q)], "Q5_1": lambda: [d, m, _fifth_bits(q), _nibbles(q)]}
    return torch.cat(parts[gtype.name](), -1).reshape(rows, -1)


def encode_float(w: torch.Tensor, gtype: GGMLType) -> torch.Tensor:
    """A float matrix [rows, width] quantized to gtype (raw bytes), or cast for F32 / F16."""
    w = w.detach().float()
    if gtype.name in ("F32", "F16"):
        return w if gtype.name == "F32" else w.to(torch.float16)
    if gtype.scheme is not None:
        codes, scales, offsets = quantize_weight(w, gtype.scheme, search=False)
        return encode_codes(codes, scales, offsets, gtype)
    blocks = {"Q4_K": q4_k_blocks, "Q6_K": q6_k_blocks}[gtype.name]
    return blocks(w.reshape(-1, 256)).reshape(w.shape[0], -1)


def q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 210] Q6_K: 16 sub-blocks of 16 with int8 scales under one float16 scale, codes 0..63
    standing for -32..31. Layout: ql[128] low nibbles, qh[64] high two bits, scales[16], d."""
    sub = x.reshape(-1, 16, 16)  # [n, sub-blocks, 16]
    peak = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))  # [n, 16, 1], signed
    s = peak / -32  # each sub-block's own scale: its peak lands on -32
    top = s.gather(1, s.abs().argmax(1, keepdim=True))  # [n, 1, 1], the largest scale, signed
    d = fp16_round(top / -128)
    d = torch.where(d == 0, torch.ones_like(d), d)
    sc = torch.round(s / d).clamp(-128, 127)  # [n, 16, 1]
    eff = d * sc
    q = torch.where(eff == 0, torch.full_like(sub, 32.0), torch.round(sub / eff.where(eff != 0, 1.0)) + 32)
    q = q.clamp(0, 63).to(torch.uint8).reshape(-1, 2, 4, 32)  # [n, halves, quarters, 32]
    ql = torch.cat([(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4),
                    (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)], -1)  # [n, 2, 64]
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    scales = sc.reshape(-1, 16).to(torch.int8).view(torch.uint8)
    return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), scales, _f16_bytes(d.reshape(-1, 1))], -1)


def q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """[n, 256] -> [n, 144] Q4_K: 8 sub-blocks of 32, value = d * sc * q - dmin * m with 6-bit sc, m and codes
    0..15. Layout: d, dmin (float16), 12 bytes of packed sc / m, 128 bytes of nibbles."""
    sub = x.reshape(-1, 8, 32)  # [n, sub-blocks, 32]
    lo = sub.amin(-1, keepdim=True).clamp(max=0)  # llama.cpp keeps zero inside the range
    scale, mins = (sub.amax(-1, keepdim=True) - lo) / 15, -lo  # [n, 8, 1] each
    d = fp16_round(scale.amax(1, keepdim=True) / 63)
    dmin = fp16_round(mins.amax(1, keepdim=True) / 63)
    sc = torch.round(scale / d.where(d > 0, 1.0)).clamp(0, 63)
    m = torch.round(mins / dmin.where(dmin > 0, 1.0)).clamp(0, 63)
    eff, off = d * sc, dmin * m
    q = torch.round((sub + off) / eff.where(eff > 0, 1.0)).clamp(0, 15)
    q = torch.where(eff > 0, q, torch.zeros_like(q)).to(torch.uint8).reshape(-1, 4, 2, 32)  # [n, chunks, lo/hi, 32]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_bytes(d.reshape(-1, 1)), _f16_bytes(dmin.reshape(-1, 1)),
                      _k4_scales(sc.reshape(-1, 8).to(torch.uint8), m.reshape(-1, 8).to(torch.uint8)), qs], -1)


def _k4_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins [n, 8] each -> 12 bytes [n, 12] as llama.cpp's get_scale_min_k4 reads them."""
    first = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6)], -1)  # [n, 8]
    last = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)  # [n, 4]
    return torch.cat([first, last], -1)


def check_exact(name: str, scheme: QScheme) -> GGMLType:
    """The GGML type storing a packed weight exactly, or a one-line refusal naming what would fit."""
    gtype = exact_type(scheme)
    if gtype is None:
        fits = ", ".join(f"{t.scheme.describe()} = {t.name}" for t in EXACT.values())
        raise SlmError(f"{name} is {scheme.describe()}, which no GGUF type stores exactly (GGUF stores {fits}); "
                       "quantize with one of those schemes, or export the float model")
    return gtype
