"""GGUF files in and out, through the `gguf` package (the llama.cpp project's own reader and writer)."""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import SlmError, require
from .progress import progress

GGUF_MAGIC = b"GGUF"


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reads over a memory-mapped GGUF header."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise SlmError(f"{self.path}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        require(self.pos + n <= len(self.buf), f"{self.path}: truncated GGUF header")
        value = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            return [self.value(item) for _ in range(n)]
        require(kind in _SCALARS, f"{self.path}: corrupt GGUF file (value type {kind})")
        return self.unpack(_SCALARS[kind])


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (GGUF lists dimensions innermost first)
    ggml_type: int
    offset: int  # absolute, in the file


def read_header(path: Path) -> tuple[dict, list[TensorInfo], mmap.mmap]:
    """(metadata, tensor infos, the file's memory map), checked for truncation and corruption."""
    require(path.is_file(), f"{path}: no such file")
    with path.open("rb") as f:
        require(f.read(4) == GGUF_MAGIC, f"{path}: not a GGUF file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    cur.pos = 4
    version, n_tensors, n_kv = cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q")
    require(version in (2, 3), f"{path}: unsupported GGUF version {version}")
    require(n_tensors < 1_000_000 and n_kv < 1_000_000, f"{path}: corrupt GGUF header")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = cur.string(), cur.unpack("<I")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append(TensorInfo(name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    for t in infos:
        t.offset += data_start
        end = t.offset + _nbytes(t)
        require(end <= len(buf), f"{path}: truncated GGUF file (tensor {t.name} ends at byte {end}, "
                f"the file has {len(buf)})")
    return meta, infos, buf


def _nbytes(t: TensorInfo) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
    return math.prod(t.shape) // block * size


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, float32 tensors) of a GGUF file; quantized tensors are dequantized."""
    meta, infos, buf = read_header(path)
    tensors = {}
    with warnings.catch_warnings():  # the map is read-only; every dequantizer writes a new tensor
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for t in progress(infos, f"reading {path.name}"):
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=_nbytes(t), offset=t.offset)
            tensors[t.name] = dequantize(raw, t.ggml_type, t.shape)
    return meta, tensors


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of one GGUF tensor -> float32 tensor of `shape`. Common block types in torch, others via gguf."""
    if ggml_type in _DEQUANT:
        return _DEQUANT[ggml_type](raw).reshape(shape)
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.constants import GGMLQuantizationType

    qtype = GGMLQuantizationType(ggml_type)
    array = gguf_dequantize(raw.numpy().reshape(shape[:-1] + (-1,)), qtype)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(shape)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).float()


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.reshape(-1, 34)  # [n_blocks, 2 bytes fp16 scale + 32 int8 codes]
    scale = _f16(blocks[:, :2])  # [n_blocks, 1]
    return (blocks[:, 2:].contiguous().view(torch.int8).float() * scale).reshape(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes 0..15: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).float()


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.reshape(-1, 18)  # [n_blocks, fp16 scale + 16 bytes of nibbles]
    return ((_nibbles(blocks[:, 2:]) - 8) * _f16(blocks[:, :2])).reshape(-1)


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.reshape(-1, 20)  # [n_blocks, fp16 scale, fp16 min, 16 bytes of nibbles]
    return (_nibbles(blocks[:, 4:]) * _f16(blocks[:, :2]) + _f16(blocks[:, 2:4])).reshape(-1)


_DEQUANT = {0: lambda raw: raw.contiguous().view(torch.float32).clone(), 1: lambda raw: _f16(raw).reshape(-1),
            30: lambda raw: raw.contiguous().view(torch.bfloat16).float(), 2: _q4_0, 3: _q4_1, 8: _q8_0}


def write_gguf(path: Path, arch: str, meta: dict, tensors: dict) -> None:
    """Write tensors and metadata; `meta` maps GGUF keys to Python values, `tensors` maps names to (data, type):
    float data for F32 / F16, GGML blocks [rows, bytes per row] (uint8) for block types (slmkit.quant.ggml)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if key not in ("general.architecture",) and value is not None:
            _add_field(writer, key, value)
    for name, (t, gtype) in tensors.items():
        if gtype.name in ("F32", "F16"):
            writer.add_tensor(name, t.detach().float().numpy().astype(np.float16 if gtype.name == "F16" else np.float32))
        else:
            writer.add_tensor(name, t.numpy(), raw_dtype=gguf.GGMLQuantizationType(gtype.id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _add_field(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise SlmError(f"cannot write GGUF field {key} of type {type(value).__name__}")


def tokenizer_gguf_meta(tokenizer) -> dict:
    """tokenizer.ggml.* fields for a byte-level BPE tokenizer (the kind llama.cpp calls gpt2)."""
    state = json.loads(tokenizer.backend.to_str())
    model = state["model"]
    require(model.get("type") == "BPE", "GGUF export supports BPE tokenizers only")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = {t["id"] for t in state.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", **tokenizer.gguf_meta,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3 if i in special else 1 for i in range(len(tokens))],
            "tokenizer.ggml.merges": merges}
    if tokenizer.bos_token_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        meta["tokenizer.ggml.eos_token_id"] = tokenizer.eos_token_id
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta
