"""Post-training quantization: the math (scheme.py), packed storage (packed.py) and the algorithms, each an
in-place step config with `apply_`: RTN (with imatrix-style importance), GPTQ, AWQ, SmoothQuant, KV cache.

    quantize_(model, GPTQConfig(scheme=QScheme(4, 32)), calib_tokens)
"""

from __future__ import annotations

import torch
from torch import nn

from .awq import AWQConfig
from .gptq import GPTQConfig
from .kvcache import KVCacheConfig
from .rtn import RTNConfig
from .scheme import QScheme
from .smoothquant import SmoothQuantConfig

__all__ = ["AWQConfig", "GPTQConfig", "KVCacheConfig", "QScheme", "RTNConfig", "SmoothQuantConfig", "quantize_"]


def quantize_(model: nn.Module, cfg, calib: torch.Tensor | None = None) -> nn.Module:
    """Apply one quantization step in place (recorded in model.compression); calib: [N, T] token ids for the
    methods that calibrate (see slmkit.calib.calibration_tokens)."""
    from ..pipeline import apply_step_

    apply_step_(model, cfg, calib)
    return model
