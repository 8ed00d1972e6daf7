"""The one module-tree walker: which linear layers a transformation touches, and how they group.

Transformations (quantize_, prune_, apply_lora_) select layers with a `LayerFilter` (glob patterns on the
qualified module names `blocks.3.attn.q_proj`, `lm_head`, ...) and replace modules with `set_module`.
`block_groups` names the structure calibration-based methods rely on: which linears read the same input and
which module produced that input (a norm whose weight can absorb a per-channel scale, or a linear whose
output rows can).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from .errors import require


@dataclass(frozen=True)
class LayerFilter:
    include: tuple[str, ...] = ("blocks.*",)  # glob patterns on qualified names; default: every block linear
    exclude: tuple[str, ...] = ()

    def __call__(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.include) and not any(fnmatchcase(name, p) for p in self.exclude)


def named_linears(model: nn.Module, layers: LayerFilter | None = None) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every float nn.Linear the filter accepts, in model order."""
    layers = layers or LayerFilter()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and layers(n)]


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (e.g. blocks.0.mlp.up_proj)."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@dataclass
class LinearGroup:
    """Linears that read one input, and the module that produced it (None when nothing can absorb a scale)."""

    names: list[str]  # relative to the block: attn.q_proj, ...
    producer: str | None = None  # attn_norm / mlp_norm (norm weight) or mlp.up_proj (output rows)
    consumers: list[nn.Module] = field(default_factory=list)


def block_groups(block: nn.Module) -> list[LinearGroup]:
    """The input-sharing groups of one decoder block, in execution order."""
    attn, mlp = block.attn, block.mlp
    sandwich = block.post_attn_norm is not None
    v_to_o = attn.n_heads == attn.n_kv_heads and not sandwich  # o reads v's rows one-to-one only without GQA
    groups = [LinearGroup(["attn.q_proj", "attn.k_proj", "attn.v_proj"], "attn_norm"),
              LinearGroup(["attn.o_proj"], "attn.v_proj" if v_to_o else None),
              LinearGroup(["mlp.gate_proj", "mlp.up_proj"] if mlp.gate_proj is not None else ["mlp.up_proj"],
                          "mlp_norm"),
              LinearGroup(["mlp.down_proj"], "mlp.up_proj" if mlp.gate_proj is not None else None)]
    for g in groups:
        g.consumers = [block.get_submodule(n) for n in g.names]
    return groups


def check_unshared(model: nn.Module) -> None:
    require(model.cfg.share_blocks == 1, "layer-wise calibration of shared blocks (share_blocks > 1) is not "
            "supported; unshare the model first")


# Packed (quantized) linear module types, registered by slmkit.quant.packed when it is imported (a model can only
# hold one after that): the walker counts them as matrices without importing the quantization package.
PACKED_LINEARS: list[type] = []


def is_matrix(module: nn.Module) -> bool:
    """A weight matrix a token's computation reads: a linear layer, float or packed (not an embedding lookup)."""
    return isinstance(module, (nn.Linear, *PACKED_LINEARS))


def matrix_numel(module: nn.Module) -> int:
    """Weights the matrix (or table) stands for: a packed one counts its logical [out, in] entries."""
    packed = getattr(module, "weight_numel", None)
    return packed if packed is not None else module.weight.numel()


def matrix_bytes(module: nn.Module) -> int:
    """Bytes the matrix (or table) really occupies: the float weight, or the packed codes, scales and offsets."""
    stored = getattr(module, "stored_bytes", None)
    return stored() if stored is not None else module.weight.numel() * module.weight.element_size()


def contiguous_state(model: nn.Module) -> dict:
    """The model's state dict, detached and contiguous (what a safetensors file takes)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}
