"""What QAT quantizes and how: a dataclass, validated against the model before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import require
from ..modules import LayerFilter
from ..quant.rtn import Q8_TABLES
from ..quant.scheme import QScheme, packed_width


@dataclass
class QATConfig:
    scheme: QScheme = field(default_factory=QScheme)
    learn_scales: bool = True  # LSQ: scales (and offsets) train beside the weights; False: fixed at their start
    search: bool = True  # start a float linear's scales from PTQ's clip search (False: plain min/max)
    embedding: QScheme | None = Q8_TABLES  # pack the embedding table (and untied head) at prepare, frozen
    layers: LayerFilter = field(default_factory=LayerFilter)

    def validate(self) -> "QATConfig":
        self.scheme.validate()
        require(self.scheme.group_size == 0 or self.scheme.group_size % 8 == 0 or self.scheme.bits in (4, 8),
                f"QAT scheme {self.scheme.describe()}: a {self.scheme.bits}-bit group must be a multiple of 8 "
                "codes to pack")
        return self

    def check_layer(self, name: str, in_features: int) -> None:
        """Refuse a layer the packed format cannot hold with this scheme (one line, before any work)."""
        try:
            self.scheme.validate(in_features)
            packed_width(self.scheme.width(in_features), self.scheme.bits)
        except Exception as exc:  # SlmError from validate / packed_width
            raise type(exc)(f"QAT scheme {self.scheme.describe()} cannot be packed for {name}: {exc}") from None
