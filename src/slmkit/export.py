"""`slm export` as one function, above the core: GGUF and float Hugging Face folders from slmkit.checkpoint, the
compressed-tensors folders (packed and sparse) from the quantization and pruning packages. It lives here, not in
checkpoint.py, so that the core imports none of the packages built on it."""

from __future__ import annotations

from pathlib import Path

from .adapters import lora_modules, merge_lora_, refuse_adapted
from .checkpoint import export_gguf, export_hf
from .errors import require
from .prune.compressed_tensors import SPARSE_FORMATS, export_hf_sparse
from .quant.compressed_tensors import export_hf_compressed
from .quant.packed import PackedWeight


def export_model(model, tokenizer, out: Path, fmt: str, file_type: str = "auto", force: bool = False) -> Path:
    """`slm export`: GGUF (export_gguf) or a Hugging Face folder (float: export_hf; packed weights:
    compressed-tensors, slmkit.quant.compressed_tensors; file_type a sparse format: compressed-tensors'
    sparse storage of a pruned float model, slmkit.prune.compressed_tensors). A LoRA adapter is merged first."""
    if lora_modules(model):  # base + LoRA adapter: export what it computes, the merged model
        merge_lora_(model)
    refuse_adapted(model, "slm export")
    if fmt == "gguf":
        return export_gguf(model, tokenizer, Path(out), file_type, force)
    if file_type in SPARSE_FORMATS:
        return export_hf_sparse(model, tokenizer, Path(out), file_type, force)
    require(file_type == "auto", f"--type {file_type} is a GGUF type; a Hugging Face folder takes auto (float or "
            f"packed weights as they are) or a sparse format: {', '.join(SPARSE_FORMATS)}")
    if any(isinstance(m, PackedWeight) for m in model.modules()):
        return export_hf_compressed(model, tokenizer, Path(out), force)
    return export_hf(model, tokenizer, Path(out), force)
