"""`make bench-serve`: aggregate generated tokens/s and request latency at 1, 4 and 16 concurrent clients
against one `nanoternary-serve` process, and the 16-client / 1-client throughput ratio (target >= 4x).

Every client streams `--rounds` greedy completions of `--max-tokens` tokens one after another, so each
level keeps exactly that many requests in flight. latency = request sent to `data: [DONE]`; ttft = to the
first text; tokens come from the server's `usage`. The server's /health says how many forward passes it
ran, hence the mean batch size. Model: `--model` (export folder or .gguf), else the newest
outputs/train/*/export/final, else a randomly initialized `tiny` model (speed does not depend on the
weights). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nanoternary.data.sources import stdlib_files
from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.io.export_dir import save_export
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM
from nanoternary.serve.launch import ServerProcess

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef walk(path):\n", "class Stack:\n    def __init__(self):\n",
           "for i in range(10):\n", "def parse_args(argv):\n    parser = "]  # fmt: skip
TOKENIZER_TEXT_BYTES = 3_000_000


def random_tiny_model(folder: Path) -> Path:
    """A freshly initialized `tiny` model with a 4096-token BPE trained on a slice of the stdlib."""
    texts, size = [], 0
    for _, path in stdlib_files():
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > TOKENIZER_TEXT_BYTES:
            break
    cfg = ModelConfig()  # the tiny preset's shape
    tokenizer = TextTokenizer.train(texts, cfg.vocab_size)
    torch.manual_seed(0)
    return save_export(folder / "random-tiny", TernaryLM(cfg), tokenizer, {"step": 0})


def default_model() -> Path | None:
    exports = sorted(Path("outputs/train").glob("*/export/final"), key=lambda p: p.stat().st_mtime)
    return exports[-1] if exports else None


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first text s, completion tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens


async def level(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `rounds` requests back to back."""

    async def client_loop(client: httpx.AsyncClient, k: int) -> list[tuple[float, float, int]]:
        return [await one_request(client, PROMPTS[(k + r) % len(PROMPTS)], max_tokens) for r in range(rounds)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(client_loop(client, k) for k in range(clients)))
        wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    latency, ttft, tokens = (np.array([r[i] for r in flat]) for i in range(3))
    return {
        "clients": clients,
        "requests": len(flat),
        "tokens": int(tokens.sum()),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(float(tokens.sum()) / wall, 1),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latency, 99)), 3),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
    }


def measure(server: ServerProcess, concurrency: list[int], rounds: int, max_tokens: int) -> list[dict]:
    asyncio.run(level(server.url, 1, 1, 8))  # warm-up
    rows = []
    for clients in concurrency:
        before = server.get("/health")
        row = asyncio.run(level(server.url, clients, rounds, max_tokens))
        after = server.get("/health")
        passes = after["forward_passes"] - before["forward_passes"]
        row["mean_batch"] = round((after["tokens_sampled"] - before["tokens_sampled"]) / max(passes, 1), 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="export folder or .gguf (default: newest export, else a random tiny model)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=8, help="requests per client, back to back")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="server torch threads (default: PyTorch's)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else default_model() or random_tiny_model(Path(tmp))
        overrides = ["access_log=false", f"limits.max_batch={max(args.concurrency)}"]
        if args.threads:
            overrides.append(f"threads={args.threads}")
        server = ServerProcess(model, *overrides)
        try:
            health = server.get("/health")
            rows = measure(server, args.concurrency, args.rounds, args.max_tokens)
        finally:
            server.stop()

    table = Table(title=f"bench-serve · {health['model']} · {health['parameters']:,} parameters · "
                        f"threads {args.threads or torch.get_num_threads()} · {args.max_tokens} tokens/request")  # fmt: skip
    for name in (
        "clients",
        "requests",
        "tokens/s",
        "p50 latency s",
        "p99 latency s",
        "p50 ttft s",
        "mean batch",
    ):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*map(str, (r["clients"], r["requests"], r["tokens_per_s"], r["latency_p50_s"],
                                 r["latency_p99_s"], r["ttft_p50_s"], r["mean_batch"])))  # fmt: skip
    Console(stderr=True).print(table)
    ratio = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    Console(stderr=True).print(
        f"throughput {rows[-1]['clients']} clients / {rows[0]['clients']} client: {ratio:.2f}x (target >= 4x)"
    )
    print(json.dumps({"model": str(model), "levels": rows, "ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
