"""Fake quantization with the packed format's exact arithmetic, and straight-through gradients.

The forward of `fake_quantize_weight` performs, operation for operation, what slmkit.quant.scheme does when it
packs a weight and what the packed product does when it reads it back: the scale (and offset) rounded to
float16, codes = clamp(round(w / scale) + mid, 0, qmax) (symmetric) or clamp(round((w - offset) / scale), 0,
qmax) (asymmetric), values = scale * (code - mid) or scale * code + offset, in float32. So a converted model's
matrices are bit for bit the matrices the prepared model multiplied by.

Backward: rounding (to an integer and to float16) passes gradients straight through; clamping does not (a weight
beyond the grid gets no gradient from the quantizer). With these two rules autograd gives the weight the clipped
straight-through estimator and the scale LSQ's gradient (Esser et al. 2020): d value / d scale = code - mid - w /
scale inside the grid, the saturated code outside it.
"""

from __future__ import annotations

import torch

from ..quant.scheme import QScheme, grouped, ungrouped


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _Fp16STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float16).to(torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return _Fp16STE.apply(x)


def fake_codes(g: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: QScheme) -> torch.Tensor:
    """Codes (float, differentiable by STE) of groups g [out, groups, width] under float16-exact scale/offset
    [out, groups, 1]: scheme.quantize's arithmetic."""
    if offset is None:
        return torch.clamp(round_ste(g / scale) + scheme.mid, 0, scheme.qmax)
    return torch.clamp(round_ste((g - offset) / scale), 0, scheme.qmax)


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                         scheme: QScheme) -> torch.Tensor:
    """w [out, in] float32 with scale/offset [out, groups] -> the float32 matrix [out, in] that packing w with
    these (float16-rounded) parameters stands for; differentiable in w, scale and offset."""
    g = grouped(w, scheme.width(w.shape[1]))  # [out, groups, width]
    s = fp16_ste(scale)[..., None]  # [out, groups, 1]
    o = None if offset is None else fp16_ste(offset)[..., None]
    q = fake_codes(g, s, o, scheme)
    values = s * (q - scheme.mid) if o is None else s * q + o  # scheme.dequantize's arithmetic
    return ungrouped(values)  # [out, in]


def weight_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 scheme: QScheme) -> torch.Tensor:
    """The uint8 codes [out, in] packing would store for w under these parameters (no gradient)."""
    with torch.no_grad():
        g = grouped(w.float(), scheme.width(w.shape[1]))
        s = scale.float().to(torch.float16).float()[..., None]
        o = None if offset is None else offset.float().to(torch.float16).float()[..., None]
        return ungrouped(fake_codes(g, s, o, scheme)).to(torch.uint8)
