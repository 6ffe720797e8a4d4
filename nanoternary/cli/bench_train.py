"""One model's measurement for `nanoternary-bench train`, run in a child process of its own (so that its
peak RSS and its compilation are its own): `python -m nanoternary.cli.bench_train '<json spec>'` prints
one JSON line.

Speed: Lightning trains the model exactly as train.py builds it (loop A); a callback interrupts it every
`chunk_steps` optimizer steps and runs the same number of steps of the reference loop B (eager fp32,
torch.optim.Muon) and of the bare loop (A's compiled step without Lightning), B and bare in alternating
order, so the loops take turns under the same machine load. Each loop's chunk is timed on the wall clock
(synchronized on CUDA) and on the process CPU clock; a ratio is the median over rounds of the per-round
ratios.

Curves: A trains `curve_steps` steps through Lightning (and, when A uses autocast, so does A in fp32),
then B trains the same steps from the same initial weights on the same batches; every per-step loss
is returned.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import get_available_flops
from omegaconf import DictConfig

from nanoternary.cli.bench_loops import FULL_PRECISION, PlainLoop, autocast_for, step_flops, wsd_schedule
from nanoternary.cli.resolvers import cpu_precision
from nanoternary.cli.train import CONF_DIR, instantiate_all, make_module
from nanoternary.data.datamodule import PreparedCorpus, TokenDataModule
from nanoternary.lit.module import lm_loss, to_container
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM
from nanoternary.optim.factory import make_optimizers

# train.py's default callbacks that act every step; the others only act on save/validation steps
STEP_CALLBACKS = ("wsd", "throughput", "garbage_collection", "progress_bar")


@dataclass
class Spec:
    """What the parent asks one child to measure (conf/bench.yaml explains the fields)."""

    model: str
    device: str = "cpu"
    batch_size: int = 8
    seq_len: int | None = None
    data: str = "seed_tokens"
    warmup_steps: int = 3
    chunk_steps: int = 2
    rounds: int = 8
    reference: bool = True
    bare: bool = True
    train_overrides: list[str] = field(default_factory=list)
    peak_tflops: float | None = None
    curve_steps: int = 0  # > 0: the curves measurement instead of the speed one


def train_config(spec: Spec, output_dir: str) -> DictConfig:
    """conf/train.yaml with the model, data and device of `spec`, logging under `output_dir`."""
    overrides = [
        f"model={spec.model}",
        f"data={spec.data}",
        f"trainer={'gpu' if spec.device == 'cuda' else 'cpu'}",
        f"paths.output_dir={output_dir}",
        f"data.batch_size={spec.batch_size}",
    ]
    if spec.seq_len:
        overrides.append(f"data.seq_len={spec.seq_len}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, *spec.train_overrides])


def make_trainer(cfg: DictConfig, max_steps: int, extra: list[L.Callback]) -> L.Trainer:
    """cfg.trainer with train.py's per-step callbacks and loggers; no validation, no checkpoints."""
    node = cfg.get("callbacks") or {}
    callbacks = [instantiate(node[name]) for name in STEP_CALLBACKS if name in node]
    return instantiate(
        cfg.trainer,
        callbacks=[*callbacks, *extra],
        logger=instantiate_all(cfg.get("logger")) or False,
        max_steps=max_steps,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def batches(cfg: DictConfig, corpus: PreparedCorpus) -> Iterator[torch.Tensor]:
    """A fresh stream of the training batches A sees, from their first one."""
    datamodule: TokenDataModule = instantiate(cfg.data)
    datamodule.corpus = corpus
    return iter(datamodule.train_dataloader())


def reference_loop(
    cfg: DictConfig, corpus: PreparedCorpus, device: torch.device, total_steps: int
) -> PlainLoop:
    """Loop B: the same model and optimizers, eager fp32, torch.optim.Muon itself."""
    optim = to_container(cfg.optim)
    model = TernaryLM(ModelConfig.from_dict(to_container(cfg.model))).to(device)
    return PlainLoop(
        "B",
        model,
        lm_loss,
        make_optimizers(model, optim, muon_cls=torch.optim.Muon),
        batches(cfg, corpus),
        optim["grad_clip"],
        schedule_of(cfg, total_steps),
        device=device,
    )


def bare_loop(cfg: DictConfig, corpus: PreparedCorpus, device: torch.device, total_steps: int) -> PlainLoop:
    """A's step without Lightning: the module's compiled loss, its optimizers, the trainer's autocast."""
    module = make_module(cfg, corpus).to(device)
    return PlainLoop(
        "bare",
        module.model,
        module.train_loss_fn,
        module.configure_optimizers(),
        batches(cfg, corpus),
        cfg.optim["grad_clip"],
        schedule_of(cfg, total_steps),
        autocast_for(cfg.trainer.precision, device),
        device,
    )


def schedule_of(cfg: DictConfig, total_steps: int) -> Callable[[int], float]:
    wsd = (cfg.get("callbacks") or {}).get("wsd")
    return wsd_schedule(to_container(wsd) if wsd is not None else None, total_steps)


class Clock:
    """Wall and process-CPU seconds since `start()`, the device drained first."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.start()

    def start(self) -> None:
        self.sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        self.sync()
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


class Interleave(L.Callback):
    """Times Lightning's steps in chunks and runs the other loops' chunks in between (see module doc)."""

    def __init__(self, loops: list[PlainLoop], spec: Spec, device: torch.device) -> None:
        self.loops, self.spec = loops, spec
        self.clock = Clock(device)
        self.chunks: dict[str, list[tuple[float, float]]] = {"A": [], **{loop.name: [] for loop in loops}}
        self.first_step_s: dict[str, float] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self.clock.start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done, spec = batch_idx + 1, self.spec
        if done == 1:
            self.first_step_s["A"] = self.clock.read()[0]
        if done == spec.warmup_steps:
            for loop in self.loops:
                self.clock.start()
                loop.step()
                self.first_step_s[loop.name] = self.clock.read()[0]
                for _ in range(spec.warmup_steps - 1):
                    loop.step()
        elif done > spec.warmup_steps and (done - spec.warmup_steps) % spec.chunk_steps == 0:
            self.chunks["A"].append(self.clock.read())
            # alternate the order of the others, so that neither always runs right after A
            for loop in self.loops if len(self.chunks["A"]) % 2 else self.loops[::-1]:
                self.clock.start()
                for _ in range(spec.chunk_steps):
                    loop.step()
                self.chunks[loop.name].append(self.clock.read())
            if len(self.chunks["A"]) == spec.rounds:
                trainer.should_stop = True
        else:
            return
        self.clock.start()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def speed_summary(
    chunks: dict[str, list[tuple[float, float]]], spec: Spec, tokens_per_step: int
) -> dict[str, Any]:
    """Median tokens/s (wall and per CPU-second) of each loop, and the median per-round ratios."""
    tokens = spec.chunk_steps * tokens_per_step
    rate = {name: [tokens / wall for wall, _ in times] for name, times in chunks.items()}
    out: dict[str, Any] = {}
    for name, times in chunks.items():
        out[f"{name}_tokens_per_s"] = statistics.median(rate[name])
        out[f"{name}_cpu_s_per_step"] = statistics.median(cpu / spec.chunk_steps for _, cpu in times)
    if "B" in rate:
        out["A_over_B"] = statistics.median(a / b for a, b in zip(rate["A"], rate["B"], strict=True))
    if "bare" in rate:
        out["A_over_bare"] = statistics.median(a / b for a, b in zip(rate["A"], rate["bare"], strict=True))
    out["chunks"] = chunks
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "lightning": L.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "cpu_bf16": cpu_precision() == "bf16-mixed",
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def measure_speed(spec: Spec, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    load_before = os.getloadavg()
    datamodule: TokenDataModule = instantiate(cfg.data)
    corpus = datamodule.prepare()
    module = make_module(cfg, corpus)
    total = spec.warmup_steps + spec.rounds * spec.chunk_steps
    loops = []
    if spec.reference:
        loops.append(reference_loop(cfg, corpus, device, total))
    if spec.bare:
        loops.append(bare_loop(cfg, corpus, device, total))
    probe = next(batches(cfg, corpus)).to(device)
    flops = step_flops(loops[0].model, lm_loss, probe) if loops else None
    interleave = Interleave(loops, spec, device)
    trainer = make_trainer(cfg, total, [interleave])
    trainer.fit(module, datamodule=datamodule)
    if len(interleave.chunks["A"]) < spec.rounds:
        raise RuntimeError(
            f"training stopped after {trainer.global_step} of {total} steps: {module.stop_reason}"
        )
    tokens_per_step = probe.shape[0] * (probe.shape[1] - 1)
    result = {
        "model": spec.model,
        "params": module.model.num_parameters(),
        "device": str(device),
        "precision": str(cfg.trainer.precision),
        "compile": bool(cfg.compile),
        "batch": list(probe.shape),
        "tokens_per_step": tokens_per_step,
        "warmup_s": interleave.first_step_s,
        "peak_rss_mb": peak_rss_mb(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        **environment(device),
        **speed_summary(interleave.chunks, spec, tokens_per_step),
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if flops is not None:
        result["flops_per_step"] = flops
        achieved = flops * result["A_tokens_per_s"] / tokens_per_step
        result["A_tflops"] = achieved / 1e12
        peak = spec.peak_tflops * 1e12 if spec.peak_tflops else get_available_flops(device, torch.bfloat16)
        result["A_mfu"] = achieved / peak if peak else None
    return result


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def lightning_losses(
    cfg: DictConfig, corpus: PreparedCorpus, weights: dict[str, torch.Tensor], steps: int
) -> list[float]:
    """Per-step training losses of `steps` steps through Lightning (A), from `weights`."""
    datamodule: TokenDataModule = instantiate(cfg.data)
    datamodule.corpus = corpus
    module = make_module(cfg, corpus)
    module.model.load_state_dict(weights)
    recorder = LossRecorder()
    make_trainer(cfg, steps, [recorder]).fit(module, datamodule=datamodule)
    return recorder.losses


def measure_curves(spec: Spec, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """A and B from the same weights on the same batches. When A runs under autocast, also A_fp32: A with
    `trainer.precision=32-true`, the control that shows how far rounding alone (compiled kernels against
    eager ones, both fp32) moves the trajectory away from B's."""
    corpus = instantiate(cfg.data).prepare()
    reference = reference_loop(cfg, corpus, device, spec.curve_steps)
    weights = {k: v.clone() for k, v in reference.model.state_dict().items()}
    result = {
        "model": spec.model,
        "precision": str(cfg.trainer.precision),
        "compile": bool(cfg.compile),
        "A_loss": lightning_losses(cfg, corpus, weights, spec.curve_steps),
    }
    if cfg.trainer.precision not in FULL_PRECISION:
        fp32 = replace(spec, train_overrides=[*spec.train_overrides, "trainer.precision=32-true"])
        fp32_cfg = train_config(fp32, str(Path(cfg.paths.output_dir) / "fp32"))
        result["A_fp32_loss"] = lightning_losses(fp32_cfg, corpus, weights, spec.curve_steps)
    result["B_loss"] = [float(reference.step()) for _ in range(spec.curve_steps)]
    return {**result, "load_avg": os.getloadavg(), **environment(device)}


def run(spec: Spec) -> dict[str, Any]:
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch.cuda.is_available() is False (a CPU-only PyTorch build?)")
    with tempfile.TemporaryDirectory(prefix="nt-bench-") as tmp:
        cfg = train_config(spec, tmp)
        L.seed_everything(cfg.seed, verbose=False)
        return measure_curves(spec, cfg, device) if spec.curve_steps else measure_speed(spec, cfg, device)


def main() -> None:
    result = run(Spec(**json.loads(sys.argv[1])))
    print("\n" + json.dumps(result))  # on a line of its own, whatever the progress bar left on stdout


if __name__ == "__main__":
    main()
