"""The machine at hand: what it is (`machine_info`) and how fast it reads memory and multiplies matrices
(`machine_speed`), the two rates the analytic floors of `cost.py` divide by.

Both microbenchmarks take about a second on torch's current threads; their results are cached per machine in
`$SLMKIT_CACHE/machine.json` (default `~/.cache/slmkit/machine.json`), keyed by CPU model, core count and
torch thread count, and re-measured only with `refresh=True`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..files import cache_dir, write_atomic

CACHE_SCHEMA = 1  # bump when a microbenchmark changes, so cached speeds are measured again
PROBE_BYTES = 256 * 2**20  # 8x the 32 MiB L3 of the reference machine: reads come from memory, not cache
MATMUL_SIZE = 512  # square float32 matrices (1 MiB each, cache-resident): 0.27 GFLOP per product, peak compute
BENCH_SECONDS = 0.6  # time budget of each microbenchmark after its warm-up (at least MIN_REPEATS timings)
MIN_REPEATS = 5


# ---- what the machine is -------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return None


def accelerator() -> str | None:
    """The name of the first CUDA device, "mps" on Apple silicon, or None."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else None


def machine_info() -> dict:
    """CPU model, cores, torch threads, total memory, OS, Python and torch versions, accelerator (or None)."""
    return {"cpu_model": cpu_model(), "cores": os.cpu_count() or 1, "threads": torch.get_num_threads(),
            "total_memory_bytes": total_memory_bytes(), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "accelerator": accelerator()}


def machine_key(info: dict) -> str:
    """What the cached speeds are valid for: the same CPU, core count and torch thread count."""
    return f"{info['cpu_model']} | {info['cores']} cores | {info['threads']} threads"


# ---- how fast it is ------------------------------------------------------------------------------------
def best_time(fn: Callable[[], object], seconds: float = BENCH_SECONDS, min_repeats: int = MIN_REPEATS) -> float:
    """The shortest of repeated timings of fn() (after one untimed warm-up call), within a time budget.

    The best, not the median: on a shared machine every disturbance makes a run slower, never faster."""
    fn()
    best, deadline, repeats = float("inf"), time.perf_counter() + seconds, 0
    while repeats < min_repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best, repeats = min(best, time.perf_counter() - start), repeats + 1
    return best


def measure_read_bandwidth_gbs(nbytes: int = PROBE_BYTES) -> float:
    """Memory read bandwidth in GB/s: torch.sum over a float32 tensor much larger than the CPU caches."""
    probe = torch.ones(nbytes // 4, dtype=torch.float32)  # every page written, so resident
    return probe.numel() * probe.element_size() / best_time(probe.sum) / 1e9


def measure_matmul_gflops(n: int = MATMUL_SIZE, dtype: torch.dtype = torch.float32) -> float:
    """Matrix-multiply throughput in GFLOP/s (2 n^3 FLOPs per n x n product), float32 unless told."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b)) / 1e9


def load_average() -> float | None:
    """The 1-minute load average: above the core count, the microbenchmarks shared the cores with others."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows
        return None


def measure_speed() -> dict:
    """Run both microbenchmarks now (about a second) on torch's current threads."""
    threads = torch.get_num_threads()
    return {"read_bandwidth_gbs": measure_read_bandwidth_gbs(),
            "read_bandwidth_how": f"best of repeated torch.sum over a {PROBE_BYTES >> 20} MiB float32 tensor, "
                                  f"{threads} threads",
            "matmul_gflops": measure_matmul_gflops(),
            "matmul_how": f"best of repeated torch.mm of two {MATMUL_SIZE}x{MATMUL_SIZE} float32 matrices, "
                          f"{threads} threads",
            "threads": threads, "load_average": load_average(),
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---- the cache -----------------------------------------------------------------------------------------
def cache_path() -> Path:
    """machine.json in $SLMKIT_CACHE (default ~/.cache/slmkit), beside the compiled kernels."""
    return cache_dir() / "machine.json"


def read_cache(path: Path) -> dict:
    """The cached speeds by machine key; empty when the file is missing, unreadable or not ours."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("schema") == CACHE_SCHEMA and isinstance(data.get("machines"), dict)
    return data["machines"] if ok else {}


def write_cache(path: Path, machines: dict) -> None:
    write_atomic(path, json.dumps({"schema": CACHE_SCHEMA, "machines": machines}, indent=2).encode())


def machine_speed(refresh: bool = False) -> dict:
    """Read bandwidth (GB/s) and matmul throughput (GFLOP/s) of this machine, with how and when each was
    measured: from the cache when this machine (CPU, cores, torch threads) is in it, else measured and cached.
    An unwritable cache folder only costs the caching (a notice on stderr)."""
    path, key = cache_path(), machine_key(machine_info())
    machines = read_cache(path)
    if refresh or key not in machines:
        machines[key] = measure_speed()
        try:
            write_cache(path, machines)
        except OSError as exc:
            print(f"slmkit: could not cache machine speeds in {path} ({exc.strerror or exc})", file=sys.stderr)
    return dict(machines[key])
