"""A burst of concurrent connections against `slm serve`: every request must get 200 or 503 (none hangs, none
500s), the server's RSS must stay bounded, and it must answer normally afterwards.

`slm serve` (default model, --parallel 8 --queue 64) on a free loopback port; N clients (default 1000) open
their connections at once, each sending one /v1/completions request (max_tokens 4), with a client timeout of
--timeout seconds (a request past it counts as hung). Peak RSS is the server's VmHWM from /proc. Then one
ordinary request is sent and must succeed.

    python benchmarks/serve_burst.py [--n 1000] [--timeout 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, start  # noqa: E402


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def burst(url: str, n: int, timeout: float) -> collections.Counter:
    async def one(client: httpx.AsyncClient, i: int) -> str:
        try:
            r = await client.post(url + "/v1/completions", json={"prompt": f"Number {i} is", "max_tokens": 4,
                                                                  "temperature": 0})
            if r.status_code == 503:
                ok = "error" in r.json() and "retry-after" in r.headers
                return "503" if ok else "503 without error body / Retry-After"
            return str(r.status_code)
        except httpx.TimeoutException:
            return "hung (client timeout)"
        except httpx.HTTPError as e:
            return f"connection error: {type(e).__name__}"

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return collections.Counter(await asyncio.gather(*(one(client, i) for i in range(n))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    port = free_port()
    proc = start("slm", port, args.threads, 8)
    url = f"http://127.0.0.1:{port}"
    try:
        idle_mb = vm_hwm_mb(proc.pid)
        t0 = time.perf_counter()
        counts = asyncio.run(burst(url, args.n, args.timeout))
        wall = time.perf_counter() - t0
        peak_mb = vm_hwm_mb(proc.pid)
        after = httpx.post(url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8,
                                                          "temperature": 0}, timeout=60)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {"n": args.n, "wall_s": wall, "statuses": dict(counts), "rss_before_mb": idle_mb, "rss_peak_mb": peak_mb,
              "after_status": after.status_code, "after_text": after.json()["choices"][0]["text"]
              if after.status_code == 200 else after.text, "server_alive": alive}
    print(json.dumps(result, indent=1))
    bad = {k: v for k, v in counts.items() if k not in ("200", "503")}
    print(f"\n{args.n} concurrent requests in {wall:.1f} s: " + ", ".join(f"{v} x {k}" for k, v in counts.most_common())
          + f"; RSS {idle_mb:.0f} MB before, peak {peak_mb:.0f} MB; afterwards {after.status_code}"
          + ("; PASS" if not bad and after.status_code == 200 and alive else f"; FAIL ({bad})"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
