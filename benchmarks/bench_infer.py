"""`make bench-infer`: decode speed of our engine vs llama.cpp (llama-cpp-python) on the same bitnet GGUF.

Measures, with the same number of CPU threads for both, interleaved round by round so that load from
other processes hits both alike (best round reported):

  ours  batch 1    tokens/s of one sequence decoding (after a prompt prefill)
  ours  batch 16   aggregate tokens/s of 16 sequences decoding together (one Engine.step per position)
  llama batch 1    tokens/s of llama.cpp decoding one sequence

plus the GGUF's size in MB and its bits per ternary weight (TQ payload, and the whole file over the
ternary weights). Without --model it exports `model=tiny_bitnet` with random weights (decode speed does
not depend on the weight values) and the stdlib code tokenizer. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import gguf
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from nanoternary.cli.resolvers import register_resolvers
from nanoternary.infer.engine import Engine
from nanoternary.io.gguf import export_gguf
from nanoternary.io.tensors import ModelTensors
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def tiny_bitnet_gguf(out: Path, qtype: str) -> Path:
    """model=tiny_bitnet with random weights and the stdlib tokenizer, as a bitnet GGUF."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        train = compose("train", overrides=["model=tiny_bitnet"])
    cfg = ModelConfig.from_dict(OmegaConf.to_container(train.model, resolve=True))
    torch.manual_seed(0)
    tokenizer = instantiate(train.data).prepare().tokenizer
    return export_gguf(out, ModelTensors.from_model(TernaryLM(cfg), tokenizer), arch="bitnet", qtype=qtype)


def ternary_bits(path: Path) -> tuple[int, float]:
    """(ternary weights, bits per ternary weight of their TQ/F16 payload)."""
    reader = gguf.GGUFReader(path)
    codes = [
        t
        for t in reader.tensors
        if t.tensor_type in (gguf.GGMLQuantizationType.TQ1_0, gguf.GGMLQuantizationType.TQ2_0)
    ]
    weights = sum(int(t.n_elements) for t in codes)
    return weights, 8 * sum(int(t.n_bytes) for t in codes) / max(weights, 1)


def ours(engine: Engine, batch: int, prompt: list[int], steps: int) -> float:
    """Aggregate decode tokens/s of `batch` sequences after a prefill."""
    seqs = [engine.start(prompt) for _ in range(batch)]
    engine.step(seqs)
    started = time.perf_counter()
    for i in range(steps):
        for s in seqs:
            engine.append(s, prompt[i % len(prompt)])
        engine.step(seqs)
    return batch * steps / (time.perf_counter() - started)


def llama(llm, prompt: list[int], steps: int) -> float:
    llm.reset()
    llm.eval(prompt)
    started = time.perf_counter()
    for i in range(steps):
        llm.eval([prompt[i % len(prompt)]])
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a bitnet GGUF (default: tiny_bitnet with random weights)")
    parser.add_argument("--qtype", default="tq2_0", choices=["tq2_0", "tq1_0"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="auto", help="our engine's backend: auto | int8 | fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_bitnet_gguf(Path(tmp) / "tiny_bitnet.gguf", args.qtype)
        engine = Engine.from_path(path, backend=args.backend)
        prompt = engine.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
        try:
            from llama_cpp import Llama

            llm = Llama(str(path), n_ctx=engine.context_length, n_threads=args.threads, verbose=False)
        except ImportError:
            llm = None
        runs: dict[str, list[float]] = {"ours batch 1": [], "ours batch 16": [], "llama.cpp batch 1": []}
        for _ in range(args.rounds):
            runs["ours batch 1"].append(ours(engine, 1, prompt, args.steps))
            if llm is not None:
                runs["llama.cpp batch 1"].append(llama(llm, prompt, args.steps))
            runs["ours batch 16"].append(ours(engine, 16, prompt, args.steps))
        weights, bits = ternary_bits(path)
        size = path.stat().st_size
    best = {k: max(v) for k, v in runs.items() if v}
    result = {
        "threads": args.threads,
        "backend": engine.backend,
        "model_parameters": engine.num_parameters,
        "gguf_mb": size / 1e6,
        "gguf_mib": size / 2**20,
        "ternary_weights": weights,
        "bits_per_ternary_weight": bits,
        "file_bits_per_ternary_weight": 8 * size / weights,
        **{f"{k} tok/s": v for k, v in best.items()},
    }
    if "llama.cpp batch 1" in best:
        base = best["llama.cpp batch 1"]
        result["batch 1 vs llama.cpp"] = best["ours batch 1"] / base
        result["batch 16 vs llama.cpp batch 1"] = best["ours batch 16"] / base
    table = Table(title=f"decode, {args.threads} threads, best of {args.rounds} rounds x {args.steps} steps")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    Console(stderr=True).print(table)
    if llm is None:
        Console(stderr=True).print("llama-cpp-python is not installed: pip install -e '.[llama]'")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
