"""Training's peak memory on glibc: large buffers handed back to the operating system when they are freed.

glibc's malloc serves blocks above a threshold with mmap (freed at once) and raises that threshold, up to
32 MB, each time such a block is freed; from the second training step on, activations and dequantized
matrices then come from its heap, whose free holes between longer-lived tensors it does not reuse well.
Measured on the default model, LoRA on a packed int4 base with activation checkpointing
(benchmarks/lora_speed.py): a peak RSS of 3.1 GB, and 0.87 GB with a fixed 1 MB threshold, which makes the
peak track live memory at the price of fresh pages for every large buffer (1.6x the step time here): what a
user short of memory wants, so it is an option (`TrainConfig.release_memory`, `slm train --low-memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
RELEASED = 1 << 20  # blocks of 1 MB and more: mmap, returned on free
STEADY = 32 << 20  # glibc's own ceiling for the dynamic threshold, restored after the run


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "mallopt") else None
    except OSError:
        return None


@contextlib.contextmanager
def large_buffers_released(enabled: bool):
    """With `enabled` (on glibc), blocks of 1 MB and more are mmapped and returned when freed, for the body."""
    lib = _libc() if enabled else None
    if lib is not None:
        lib.mallopt(M_MMAP_THRESHOLD, RELEASED)
    try:
        yield lib is not None
    finally:
        if lib is not None:
            lib.mallopt(M_MMAP_THRESHOLD, STEADY)
