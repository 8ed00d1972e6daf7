"""KV-cache quantization: keys and values stored as int8 or int4 codes, per token and head, in groups along
the head dimension, with float16 scales (and offsets, asymmetric). Generation uses it through
`Decoder.new_cache()` once `use_quantized_cache_` has set `model.kv_scheme` and `model.cache_type` (the
`KVCacheConfig` pipeline step, which changes no weight, and the loader of a checkpoint that records a
scheme). Memory per cached token and layer: 2 x kv_heads x (head_dim x bits / 8 + groups x 2 [x 2]) bytes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from ..calib import CalibConfig
from ..errors import require
from ..model import cache_end, write_rows
from .scheme import QScheme, dequantize, pack, packed_width, qparams, quantize, unpack


@dataclass
class KVCacheConfig:
    scheme: QScheme = field(default_factory=lambda: QScheme(8, 0, False))  # group 0: a whole head per scale
    calib: CalibConfig = field(default_factory=CalibConfig)
    method: ClassVar[str] = "kv_cache"
    needs_calibration: ClassVar[bool] = False

    def apply_(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        require(self.scheme.bits in (4, 8), f"KV-cache quantization supports 8 and 4 bits, got {self.scheme.bits}")
        self.scheme.validate(model.cfg.head_size)
        use_quantized_cache_(model, self.scheme)


def use_quantized_cache_(model: nn.Module, scheme: QScheme) -> None:
    """From now on model.new_cache() makes a QuantKVCache with `scheme` (recorded in the checkpoint)."""
    model.kv_scheme = scheme
    model.cache_type = partial(QuantKVCache, scheme=scheme)


class _Store:
    """Codes, scales and offsets of one layer's keys (or values): [B, K, max_len, ...]."""

    def __init__(self, shape: tuple[int, int, int, int], scheme: QScheme, device):
        B, K, L, D = shape
        groups = D // scheme.width(D)
        self.codes = torch.zeros(B, K, L, packed_width(D, scheme.bits), dtype=torch.uint8, device=device)
        self.scales = torch.zeros(B, K, L, groups, dtype=torch.float16, device=device)
        self.offsets = None if scheme.symmetric else torch.zeros_like(self.scales)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scales, self.offsets) if t is not None]

    def rows(self, start: int, stop: int) -> "_Store":
        view = copy.copy(self)
        view.codes, view.scales = self.codes[start:stop], self.scales[start:stop]
        view.offsets = None if self.offsets is None else self.offsets[start:stop]
        return view


class QuantKVCache:
    """Drop-in for model.KVCache: `update` stores the new keys/values quantized and returns all of them so
    far, dequantized to the activation dtype."""

    def __init__(self, cfg, batch: int, max_len: int, dtype: torch.dtype, device=None, *, scheme: QScheme):
        self.max_len, self.scheme, self.dtype = max_len, scheme, dtype
        self.width = scheme.width(cfg.head_size)
        self.keys, self.values = [], []
        for layer in range(cfg.n_layers):
            _, kv = cfg.heads_of(layer // cfg.share_blocks)
            shape = (batch, kv, max_len, cfg.head_size)
            self.keys.append(_Store(shape, scheme, device))
            self.values.append(_Store(shape, scheme, device))

    def update(self, layer: int, pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, K, T, D] in the first B rows at positions pos..pos+T (an int or per-row starts [B]);
        return those rows' keys and values so far [B, K, S, D], dequantized."""
        B, end = k.shape[0], cache_end(pos, k.shape[2], self.max_len)
        self._put(self.keys[layer], pos, k)
        self._put(self.values[layer], pos, v)
        return self._get(self.keys[layer], B, end), self._get(self.values[layer], B, end)

    def rows(self, start: int, stop: int) -> "QuantKVCache":
        """The cache of rows start..stop, sharing this one's memory (see model.KVCache.rows)."""
        view = copy.copy(self)
        view.keys, view.values = [s.rows(start, stop) for s in self.keys], [s.rows(start, stop) for s in self.values]
        return view

    def move_row(self, src: int, dst: int) -> None:
        for store in self.keys + self.values:
            for t in store.tensors():
                t[dst] = t[src]

    def _put(self, store: _Store, pos, x: torch.Tensor) -> None:
        g = x.float().unflatten(-1, (-1, self.width))  # [B, K, T, groups, width]
        scale, offset = qparams(g, self.scheme)  # [B, K, T, groups, 1]
        write_rows(store.codes, pos, pack(quantize(g, scale, offset, self.scheme).flatten(-2), self.scheme.bits))
        write_rows(store.scales, pos, scale[..., 0].half())
        if offset is not None:
            write_rows(store.offsets, pos, offset[..., 0].half())

    def _get(self, store: _Store, B: int, end: int) -> torch.Tensor:
        codes = unpack(store.codes[:B, :, :end], self.scheme.bits).unflatten(-1, (-1, self.width))  # [B,K,S,groups,w]
        offsets = None if store.offsets is None else store.offsets[:B, :, :end, :, None].float()
        x = dequantize(codes, store.scales[:B, :, :end, :, None].float(), offsets, self.scheme)
        return x.flatten(-2).to(self.dtype)  # [B, K, S, D]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.keys + self.values for t in s.tensors())
