"""Quantization-aware training to slmkit's packed formats.

    prepare_qat_(model, QATConfig(QScheme(3, 32, symmetric=False)))   # linears -> FakeQuantLinear
    train(model, data, cfg)                                          # the one training loop, any objective
    convert_qat_(model)                                              # FakeQuantLinear -> packed QuantLinear

A FakeQuantLinear multiplies by exactly the matrix its packed form will hold (fake.py), so `convert_qat_`
changes no logit of a prefill. It starts from a float linear (scales by the same clip search PTQ uses) or from
a packed one (AWQ, GPTQ, RTN: its codes, scales and offsets reproduced exactly at step 0).
"""

from .config import QATConfig
from .fake import fake_quantize_weight, weight_codes
from .modules import FakeQuantLinear, convert_qat_, prepare_qat_
from .step import QATStep

__all__ = ["FakeQuantLinear", "QATConfig", "QATStep", "convert_qat_", "fake_quantize_weight", "prepare_qat_",
           "weight_codes"]
