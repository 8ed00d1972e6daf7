"""slmkit's own CPU kernels (C, built once with the system compiler and loaded with ctypes).

torch's batch-1 CPU matrix-vector product reads fp32 weights at about 10 GB/s on the reference machine, a
third of what the memory delivers; decode spends most of its time there (see benchmarks/decode_speed.py).
`small_matmul` reads each weight row once for a handful of input rows at close to memory bandwidth;
`packed_matmul` does the same for packed 8- and 4-bit weights (slmkit.quant.packed), reading the codes and
float16 scales as stored (4x / about 7x fewer bytes than fp32). Without a C compiler, or with SLMKIT_KERNELS=0,
everything falls back to torch (packed weights are then dequantized for each product).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ..files import cache_dir

SOURCE = Path(__file__).with_name("gemv.c")
MAX_ROWS = 8  # up to this many input rows (batch x new tokens) the kernel beats torch's GEMM
MAX_ROWS_BF16 = 64  # bf16 weights: torch converts the whole matrix to float32 first, so ours wins up to ~64 rows
#                     (measured here: 2 threads, 8 to 128 rows on the default model's shapes; even at 128)
# Below this many weights one thread is faster than waking a team: an OpenMP region costs microseconds when
# idle and milliseconds when another process holds the cores (measured while a benchmark ran beside the tests).
MIN_PARALLEL_WEIGHTS = 1 << 17
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _build(source: Path) -> Path:
    """Compile `source` once per (source, flags, machine); the .so is renamed into place when complete."""
    key = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode() + os.uname().machine.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([os.environ.get("CC", "gcc"), *FLAGS, "-o", tmp, str(source)], check=True,
                           capture_output=True, timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, or no working compiler: a one-line notice on stderr)."""
    if os.environ.get("SLMKIT_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build(SOURCE)))
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"slmkit: CPU kernels unavailable ({type(exc).__name__}); using torch's matmul", file=sys.stderr)
        return None
    args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int]
    for fn in (lib.gemv_f32, lib.gemv_bf16):
        fn.argtypes, fn.restype = args, None
    lib.gemv_packed.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 4, ctypes.c_int]
    lib.gemv_packed.restype = ctypes.c_int
    lib.dequant_packed.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 3, ctypes.c_int]
    lib.dequant_packed.restype = None
    return lib


def _rows(x: torch.Tensor, weight: torch.Tensor, width: int, max_rows: int = MAX_ROWS) -> int | None:
    """How many rows x [..., in] holds when a kernel may take x @ W.T (W [out, width] stored in `weight`): few
    rows, the right width (else torch raises its shape error), on the CPU, no autograd through the product;
    else None. Every check here runs once per linear per token: keep them cheap."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows > max_rows or x.shape[-1] != width or not (x.is_cpu and weight.is_cpu)
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    return rows


def _threads(weights: int) -> int:
    return torch.get_num_threads() if weights >= MIN_PARALLEL_WEIGHTS else 1


def _launch(x: torch.Tensor, out: int, kernel) -> torch.Tensor:
    """kernel(x pointer, y pointer) on x as contiguous float32 [rows, in], into a fresh float32 y [rows, out];
    returns y as [..., out] in x's dtype."""
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
    kernel(xf.data_ptr(), y.data_ptr())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def small_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x [..., in] @ weight[out, in].T with slmkit's kernel, or None when it does not apply (many rows,
    autograd, another device or dtype): the caller then uses torch."""
    rows = _rows(x, weight, weight.shape[-1], MAX_ROWS_BF16 if weight.dtype == torch.bfloat16 else MAX_ROWS)
    lib = library() if rows is not None else None
    if (lib is None or weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16)
            or not weight.is_contiguous()):
        return None
    fn = lib.gemv_f32 if weight.dtype == torch.float32 else lib.gemv_bf16
    out, width, threads = weight.shape[0], weight.shape[1], _threads(weight.numel())
    return _launch(x, out, lambda xp, yp: fn(weight.data_ptr(), xp, yp, rows, out, width, threads))


def packed_matmul(x: torch.Tensor, packed) -> torch.Tensor | None:
    """x [..., in] @ W.T for a packed low-bit weight (slmkit.quant.packed.PackedWeight), or None when no
    kernel applies (many rows, autograd, another device, other bits or buffer types): the caller then
    dequantizes and uses torch. 8- and 4-bit codes, symmetric or asymmetric, any group size dividing in (even
    for 4 bits), fp16 scales and offsets read as stored."""
    buffers = packed._buffers  # three plain dict lookups; nn.Module.__getattr__ costs microseconds each
    q, scales, offsets = buffers["qweight"], buffers["scales"], buffers["offsets"]
    rows = _rows(x, q, packed.in_features)
    lib = library() if rows is not None else None
    if lib is None or not _kernel_layout(packed.scheme, packed.in_features, q, scales, offsets):
        return None
    bits, out, width = packed.scheme.bits, packed.out_features, packed.in_features
    group, threads = packed.scheme.width(width), _threads(packed.weight_numel)
    offsets_ptr = None if offsets is None else offsets.data_ptr()

    def kernel(xp, yp):
        if lib.gemv_packed(bits, q.data_ptr(), scales.data_ptr(), offsets_ptr, xp, yp, rows, out, width, group,
                           threads):
            raise MemoryError("slmkit: gemv_packed could not allocate its scratch memory")
    return _launch(x, out, kernel)


def dequantize(packed) -> torch.Tensor | None:
    """The float32 matrix [out, in] of a packed weight (as scheme.dequantize_weight computes it, bit for bit),
    or None when no kernel applies (other bits or buffer types, another device)."""
    buffers = packed._buffers
    q, scales, offsets = buffers["qweight"], buffers["scales"], buffers["offsets"]
    lib = library() if q.is_cpu else None
    if lib is None or not _kernel_layout(packed.scheme, packed.in_features, q, scales, offsets):
        return None
    out, width = packed.out_features, packed.in_features
    W = torch.empty(out, width, dtype=torch.float32)
    lib.dequant_packed(packed.scheme.bits, q.data_ptr(), scales.data_ptr(),
                       None if offsets is None else offsets.data_ptr(), W.data_ptr(), out, width,
                       packed.scheme.width(width), _threads(packed.weight_numel))
    return W


def _kernel_layout(scheme, width: int, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> bool:
    """Whether gemv_packed can read these buffers as they are: 8 or 4 bits, whole groups (of even width for 4
    bits), contiguous uint8 codes and float16 scales / offsets (a model cast with .to(dtype) converts them).
    Shapes are PackedWeight's own: set at construction and kept by load_state_dict."""
    group = scheme.width(width)
    return (scheme.bits in (8, 4) and width % group == 0 and (scheme.bits == 8 or group % 2 == 0)
            and q.dtype == torch.uint8 and q.is_contiguous()
            and scales.dtype == torch.float16 and scales.is_contiguous()
            and (offsets is None or offsets.dtype == torch.float16 and offsets.is_contiguous()))
