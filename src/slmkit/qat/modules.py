"""FakeQuantLinear and the two verbs, prepare_qat_ and convert_qat_ (one walk over the model's linears each)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import require
from ..modules import set_module
from ..quant.packed import QuantLinear, quantized_linear
from ..quant.rtn import quantize_tables_
from ..quant.scheme import QScheme, grouped, qparams, search_qparams
from .config import QATConfig
from .fake import fake_quantize_weight, weight_codes


class FakeQuantLinear(nn.Module):
    """A linear layer whose forward multiplies by its weight as packed with `scheme`.

    Parameters: `weight` [out, in] (float32 master), and with learned scales `log_scale` [out, groups] and (asym)
    `offset_shift` [out, groups]: scale = scale0 * exp(log_scale), offset = offset0 + scale0 * offset_shift, so
    an optimizer's step is relative to the grid whatever the layer's magnitude, and at zero they are exactly the
    starting parameters (scale0, offset0: buffers)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                 offset: torch.Tensor | None, scheme: QScheme, learn_scales: bool):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.register_buffer("scale0", scale.detach().float().clone())  # [out, groups], float16-exact
        self.register_buffer("offset0", None if offset is None else offset.detach().float().clone())
        zeros = torch.zeros_like(self.scale0)
        self.log_scale = nn.Parameter(zeros.clone()) if learn_scales else None
        self.offset_shift = nn.Parameter(zeros.clone()) if learn_scales and offset is not None else None

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The current scale and offset [out, groups] (before their float16 rounding)."""
        scale = self.scale0 if self.log_scale is None else self.scale0 * torch.exp(self.log_scale)
        if self.offset0 is None:
            return scale, None
        return scale, self.offset0 if self.offset_shift is None else self.offset0 + self.scale0 * self.offset_shift

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize_weight(self.weight, *self.qparams(), self.scheme)  # [out, in] float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.quantized_weight().to(x.dtype))  # the packed product's many-row path
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_packed(self) -> QuantLinear:
        scale, offset = self.qparams()
        scale16 = scale.detach().to(torch.float16).float()
        offset16 = None if offset is None else offset.detach().to(torch.float16).float()
        codes = weight_codes(self.weight, scale16, offset16, self.scheme)
        shell = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        if self.bias is not None:
            shell.bias.data = self.bias.detach().clone()
        return quantized_linear(shell, codes, scale16, offset16, self.scheme)

    def extra_repr(self) -> str:
        learned = "learned" if self.log_scale is not None else "fixed"
        return f"{self.in_features} -> {self.out_features}, fake {self.scheme.describe()}, {learned} scales"


def prepare_qat_(model: nn.Module, cfg: QATConfig) -> nn.Module:
    """Replace every linear cfg.layers accepts (float, or packed by PTQ) with a FakeQuantLinear; pack the
    embedding table (frozen) with cfg.embedding. Every layer is checked before any is changed."""
    cfg.validate()
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and cfg.layers(n)]
    require(bool(chosen), f"QAT: no linear matches the layers {list(cfg.layers.include)}")
    for name, m in chosen:
        cfg.check_layer(name, m.in_features)
        require(not getattr(m, "act_bits", 0), f"QAT: {name} quantizes its activations (SmoothQuant); QAT trains "
                "weight-only formats")
    for name, m in chosen:
        set_module(model, name, _fake(m, cfg))
    quantize_tables_(model, cfg.embedding, cfg.search)
    return model


def _fake(m: nn.Module, cfg: QATConfig) -> FakeQuantLinear:
    if isinstance(m, QuantLinear):  # a PTQ result: its own grid, reproduced exactly
        offsets = None if m.offsets is None else m.offsets.float()
        return FakeQuantLinear(m.dequantize(), m.bias, m.scales.float(), offsets, m.scheme, cfg.learn_scales)
    g = grouped(m.weight.data.float(), cfg.scheme.width(m.in_features))  # [out, groups, width]
    scale, offset = search_qparams(g, cfg.scheme) if cfg.search else qparams(g, cfg.scheme)
    return FakeQuantLinear(m.weight.data, m.bias, scale[..., 0], None if offset is None else offset[..., 0],
                           cfg.scheme, cfg.learn_scales)


def convert_qat_(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear with the packed QuantLinear of its current weight and grid."""
    fakes = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name, m in fakes:
        set_module(model, name, m.to_packed())
    return model


def fake_linears(model: nn.Module) -> list[tuple[str, FakeQuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
