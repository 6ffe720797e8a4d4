"""`nanoternary-generate model=<export folder | .gguf> prompt="def fib(n):"`: stream a completion."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from nanoternary.infer.engine import Engine, Generation
from nanoternary.infer.sampling import SamplingParams

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "generate")


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def hydra_quote(value: str) -> str:
    """`value` as a single-quoted Hydra override value (quotes escaped, and the backslashes before them)."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def quote_prompt(argv: list[str]) -> list[str]:
    """Let `prompt=def fib(n):` (the shell already removed its quotes) through Hydra's override grammar,
    which would otherwise reject the parentheses, commas or quotes of source code."""
    return [
        f"prompt={hydra_quote(a[len('prompt=') :])}"
        if a.startswith("prompt=") and a[7:8] not in ("'", '"')
        else a
        for a in argv
    ]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def run(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    started = time.perf_counter()
    engine = Engine.from_path(cfg.model, device=cfg.device, backend=cfg.backend)
    info(
        f"{engine.name}: {engine.num_parameters:,} parameters, backend {engine.backend} on {engine.device}, "
        f"loaded in {time.perf_counter() - started:.2f} s"
    )
    params = SamplingParams(cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.top_k, list(cfg.stop), cfg.seed)
    gen = Generation(engine, engine.encode_prompt(cfg.prompt), params)
    if cfg.echo:
        print(cfg.prompt, end="", flush=True)
    started = time.perf_counter()
    while not gen.done:  # Engine.stream's loop, kept here for the token count
        print(gen.feed(engine.step([gen.seq])[0]), end="", flush=True)
    elapsed, done = time.perf_counter() - started, gen.completion()
    print(flush=True)
    info(
        f"{done.completion_tokens} tokens in {elapsed:.2f} s ({done.completion_tokens / max(elapsed, 1e-9):.1f} "
        f"tokens/s incl. prefill of {done.prompt_tokens}), finish_reason={done.finish_reason}"
    )


def main() -> None:
    sys.argv = quote_prompt(sys.argv)
    run()


if __name__ == "__main__":
    main()
