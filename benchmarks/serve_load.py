"""Concurrent streaming clients against `slm serve` and llama-cpp-python's OpenAI server, side by side.

All serve the default model's GGUF (SmolLM2-135M-Instruct Q4_1) on loopback with 2 threads: `slm` (slmkit's
runtime, bf16 weights), `slm-llamacpp` (slm serve --backend llamacpp: the same batching engine over one
llama.cpp context of several sequences) and `llama-cpp-python` (its own server). For each number
of concurrent clients (1, 4, 8, 16 by default), each client sends --requests streaming /v1/completions
requests one after another (fixed prompts, max_tokens --tokens, temperature 0); the servers take turns per
level, the order alternating by round. Definitions as vLLM's benchmark_serving: TTFT = request sent to the
first generated text; TPOT = (last token time - first token time) / (tokens - 1) per request; aggregate
throughput = generated tokens / wall time of the level. Tokens are the streamed text chunks (one per token
on both servers). llama-cpp-python runs with --interrupt_requests False: by default it cuts a streaming
answer off when the next request arrives, which would make its numbers meaningless here.

    python benchmarks/serve_load.py [--clients 1,4,8,16] [--requests 2] [--tokens 64] [--rounds 1]
                                    [--servers slm,slm-llamacpp,llama-cpp-python] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["The history of the city begins in", "In the morning the farmers of the valley",
           "The theory of evolution explains", "A good recipe for bread starts with",
           "The old lighthouse keeper remembered", "Scientists studying the deep ocean found",
           "The rules of chess are simple:", "When the train finally arrived at the station"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_path() -> str:
    from slmkit.loader import resolve

    return str(resolve(None))


def start(server: str, port: int, threads: int, parallel: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if server in ("slm", "slm-llamacpp"):
        cmd = [sys.executable, "-m", "slmkit", "serve", gguf_path(), "--port", str(port), "--threads", str(threads),
               "--parallel", str(parallel), "--queue", "256", "--ctx", "1024", "--name", "model",
               "--backend", "llamacpp" if server == "slm-llamacpp" else "torch"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path(), "--port", str(port),
               "--n_threads", str(threads), "--n_ctx", "1024", "--interrupt_requests", "False",
               "--model_alias", "model", "--host", "127.0.0.1"]
    log = tempfile.TemporaryFile()  # not a pipe: llama.cpp's load log would fill it and block the server
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{server} exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{server} did not start within 180 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> dict:
    body = {"model": "model", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    sent, stamps = time.perf_counter(), []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    n = len(stamps)
    return {"ttft": stamps[0] - sent if n else None, "tpot": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else None,
            "tokens": n}


async def level(url: str, clients: int, requests: int, tokens: int) -> dict:
    async def client_loop(i: int, client: httpx.AsyncClient) -> list[dict]:
        return [await one_request(client, url, PROMPTS[(i + j) % len(PROMPTS)], tokens) for j in range(requests)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        done = await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - start
    rows = [r for per_client in done for r in per_client]
    return {"clients": clients, "requests": len(rows), "tokens": sum(r["tokens"] for r in rows), "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in rows) / wall,
            **{f"{m}_{q}": pct([r[m] for r in rows if r[m] is not None], q) for m in ("ttft", "tpot") for q in (50, 99)}}


def pct(xs: list[float], q: int) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--servers", default="slm,slm-llamacpp,llama-cpp-python")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    servers = args.servers.split(",")
    results = {s: {c: [] for c in levels} for s in servers}
    procs = {}
    try:
        for s in servers:
            port = free_port()
            procs[s] = (start(s, port, args.threads, max(levels)), f"http://127.0.0.1:{port}")
            asyncio.run(level(procs[s][1], 1, 1, 8))  # warm-up
        for r in range(args.rounds):
            for c in levels:
                for s in (servers if r % 2 == 0 else servers[::-1]):
                    row = asyncio.run(level(procs[s][1], c, args.requests, args.tokens))
                    results[s][c].append(row)
                    print(f"[round {r + 1}] {s:17s} {c:3d} clients: {row['tok_s']:7.1f} tok/s, TTFT p50 "
                          f"{row['ttft_50'] * 1000:7.0f} ms, TPOT p50 {row['tpot_50'] * 1000:6.1f} ms", file=sys.stderr)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    report(results, levels, servers, args)


def report(results: dict, levels: list[int], servers: list[str], args) -> None:
    med = {s: {c: {k: statistics.median(r[k] for r in results[s][c]) for k in results[s][c][0]} for c in levels}
           for s in servers}
    print(f"\n{args.requests} requests per client, max_tokens {args.tokens}, {args.threads} threads, "
          f"{args.rounds} round(s) (medians)\n")
    print("| server | clients | tok/s | × its 1 client | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | × llama-cpp-python |")
    print("|---|---|---|---|---|---|---|")
    for s in servers:
        for c in levels:
            m = med[s][c]
            base = med[s][levels[0]]["tok_s"]
            peer = med.get("llama-cpp-python", {}).get(c)
            vs = f"{m['tok_s'] / peer['tok_s']:.2f}" if peer and s != "llama-cpp-python" else ""
            print(f"| {s} | {c} | {m['tok_s']:.1f} | {m['tok_s'] / base:.2f} | {m['ttft_50'] * 1000:.0f} / "
                  f"{m['ttft_99'] * 1000:.0f} | {m['tpot_50'] * 1000:.1f} / {m['tpot_99'] * 1000:.1f} | {vs} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results, "medians": med}, indent=1))


if __name__ == "__main__":
    main()
