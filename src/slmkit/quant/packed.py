"""Packed low-bit weights that stay packed in memory: linear layers and embedding tables.

A packed weight holds `qweight` (uint8, exactly `bits` bits per code: see scheme.pack), `scales` (float16
[out, groups]) and, for asymmetric schemes, `offsets` (float16 [out, groups]). Its bytes in memory are those
buffers and nothing else: no float copy is kept. Few-row products (decode) run in slmkit's C kernels, which
read the codes directly; many-row products (prefill, scoring) dequantize the matrix once per call and use
torch's GEMM, whose cost is then shared by all rows. A product whose input needs a gradient (QLoRA, training
through a packed model) goes through `PackedProduct`: the float matrix is made for the forward product and
made again for the backward one, never saved between them, so training holds no float copy of the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..modules import PACKED_LINEARS, contiguous_state, set_module
from .scheme import QScheme, dequantize_weight, pack, packed_width, unpack


class PackedWeight(nn.Module):
    """Base of QuantLinear and QuantEmbedding: the packed buffers and the products that read them."""

    def __init__(self, out_features: int, in_features: int, scheme: QScheme):
        super().__init__()
        self.out_features, self.in_features, self.scheme = out_features, in_features, scheme.validate(in_features)
        groups = in_features // scheme.width(in_features)
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, scheme.bits),
                                                     dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("offsets", None if scheme.symmetric else torch.zeros(out_features, groups,
                                                                                      dtype=torch.float16))

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> "PackedWeight":
        """Store codes [out, in] with scales/offsets [out, groups] (already float16-exact: see scheme.qparams)."""
        self.qweight = pack(codes, self.scheme.bits)
        self.scales = scales.to(torch.float16).contiguous()
        if offsets is not None:
            self.offsets = offsets.to(torch.float16).contiguous()
        return self

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.scheme.bits)  # [out, in]

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix [out, in] these codes stand for (slmkit's C dequantizer for 8 and 4 bits, else
        torch; the same values either way)."""
        W = kernels.dequantize(self)
        return W if W is not None else dequantize_weight(self.codes(), self.scales, self.offsets, self.scheme)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W.T -> [..., out]; differentiable in x (the packed W itself never trains)."""
        if x.requires_grad and torch.is_grad_enabled():
            return PackedProduct.apply(x, self)
        y = kernels.packed_matmul(x, self)
        if y is None:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    def stored_bytes(self) -> int:
        """Bytes the codes, scales and offsets occupy."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.offsets) if t is not None)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.scheme.describe()}"


class PackedProduct(torch.autograd.Function):
    """y = x @ W.T for a frozen packed W, with d x = d y @ W: W is dequantized in the forward and again in the
    backward, and autograd saves only the module (not a float matrix). Under autocast the products run in
    the autocast dtype, as F.linear's would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "PackedWeight") -> torch.Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        ctx.dtype = _product_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(ctx.dtype), module.dequantize().to(ctx.dtype))  # [..., out]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_x = grad_y.to(ctx.dtype) @ ctx.module.dequantize().to(ctx.dtype)  # [..., in]
        return grad_x.to(ctx.x_dtype), None


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class QuantLinear(PackedWeight):
    """A packed linear layer. With act_bits (SmoothQuant's W8A8) its input is also quantized, dynamically per
    token and symmetric, before the product."""

    def __init__(self, in_features: int, out_features: int, scheme: QScheme, bias: bool = False, act_bits: int = 0):
        super().__init__(out_features, in_features, scheme)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = quantize_activations(x, self.act_bits)
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activations int{self.act_bits} per token" if self.act_bits else "")


PACKED_LINEARS.append(QuantLinear)


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic per-token symmetric quantization of x [..., C]: the values int`bits` codes times a per-token
    scale stand for (the product that follows equals an integer product rescaled, up to float summation)."""
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax  # [..., 1]
    return torch.round(x / scale).clamp_(-qmax, qmax) * scale


class QuantEmbedding(PackedWeight):
    """A packed embedding table; `project` uses it as the (tied) output matrix."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QScheme):
        super().__init__(num_embeddings, embedding_dim, scheme)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] -> rows [..., C], dequantizing only the rows asked for."""
        flat = tokens.reshape(-1)
        offsets = None if self.offsets is None else self.offsets[flat]
        rows = dequantize_weight(unpack(self.qweight[flat], self.scheme.bits), self.scales[flat], offsets,
                                 self.scheme)  # [N, C]
        return rows.reshape(*tokens.shape, self.embedding_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


def quantized_linear(linear: nn.Linear, codes, scales, offsets, scheme: QScheme) -> QuantLinear:
    """A QuantLinear holding the given codes in place of `linear` (its bias kept in float32)."""
    q = QuantLinear(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None)
    if linear.bias is not None:
        q.bias.data = linear.bias.data.float().clone()
    return q.set_codes(codes, scales, offsets)


def quantized_embedding(embedding: nn.Embedding, codes, scales, offsets, scheme: QScheme) -> QuantEmbedding:
    q = QuantEmbedding(embedding.num_embeddings, embedding.embedding_dim, scheme)
    return q.set_codes(codes, scales, offsets)


def state_with_packed_as(model: nn.Module, parts: Callable[[str, PackedWeight], dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
    """The model's state (detached, contiguous) with each packed module's buffers (qweight, scales, offsets)
    replaced by parts(name, module) = {suffix: tensor}, stored as NAME.suffix: what an export writes instead."""
    state = contiguous_state(model)
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):
            for buffer in ("qweight", "scales", "offsets"):
                state.pop(f"{name}.{buffer}", None)
            state.update({f"{name}.{suffix}": t for suffix, t in parts(name, module).items()})
    return state


def packed_layout(model: nn.Module) -> dict[str, dict]:
    """{module name: {kind, bits, group_size, symmetric}} of every packed module: what loading must rebuild."""
    return {name: {"kind": "embedding" if isinstance(m, QuantEmbedding) else "linear", **dataclasses.asdict(m.scheme),
                   "act_bits": getattr(m, "act_bits", 0)}
            for name, m in model.named_modules() if isinstance(m, PackedWeight)}


def restore_layout_(model: nn.Module, layout: dict[str, dict]) -> None:
    """Put empty packed modules where `layout` says (before loading a state dict into them)."""
    for name, spec in layout.items():
        scheme = QScheme(spec["bits"], spec["group_size"], spec["symmetric"])
        old = model.get_submodule(name)
        if spec["kind"] == "embedding":
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, scheme)
        else:
            new = QuantLinear(old.in_features, old.out_features, scheme, old.bias is not None, spec.get("act_bits", 0))
        set_module(model, name, new)
