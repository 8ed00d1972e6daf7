"""slmkit's own CPU kernels (C, built once with the system compiler and loaded with ctypes).

torch's batch-1 CPU matrix-vector product reads fp32 weights at about 10 GB/s on the reference machine, a
third of what the memory delivers; decode spends most of its time there (see benchmarks/decode_speed.py).
`small_matmul` reads each weight row once for a handful of input rows at close to memory bandwidth. Without
a C compiler, or with SLMKIT_KERNELS=0, everything falls back to torch.
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
    return lib


def small_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x [..., in] @ weight[out, in].T with slmkit's kernel, or None when it does not apply (many rows,
    autograd, another device or dtype): the caller then uses torch."""
    rows = x.numel() // x.shape[-1]
    if (rows > MAX_ROWS or x.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            or not weight.is_contiguous()):
        return None
    lib = library()
    if lib is None:
        return None
    fn = lib.gemv_f32 if weight.dtype == torch.float32 else lib.gemv_bf16
    xf = x.reshape(rows, x.shape[-1]).float().contiguous()  # [rows, in]
    y = torch.empty(rows, weight.shape[0], dtype=torch.float32)  # [rows, out]
    threads = torch.get_num_threads() if weight.numel() >= MIN_PARALLEL_WEIGHTS else 1
    fn(weight.data_ptr(), xf.data_ptr(), y.data_ptr(), rows, weight.shape[0], weight.shape[1], threads)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)  # [..., out]
