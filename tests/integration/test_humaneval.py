"""HumanEval end to end: the shipped problems through real sandboxes, completions from fixed texts, from
a real HTTP server on loopback, and through the `nanoternary-eval` CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from nanoternary.evals.humaneval import (
    STOP_SEQUENCES,
    CanonicalCompleter,
    CodeExecutionNotAllowed,
    EndpointCompleter,
    EndpointError,
    EngineCompleter,
    Problem,
    SamplingParams,
    category,
    evaluate,
    load_problems,
    truncate_at_stop,
)
from nanoternary.evals.sandbox import Limits
from nanoternary.infer.kernels import native_ops
from nanoternary.serve.launch import ServerProcess
from tests.serve_server import API_KEY, TINY, build_tiny_model

REPO = Path(__file__).resolve().parents[2]
WORKERS = os.cpu_count() or 2


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_problems()


class FixedCompleter:
    """Hands out the given texts in order, one per prompt; counts the prompts it was asked for."""

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.prompts = list(texts), []

    def generate(self, prompts: list[str]) -> list[str]:
        self.prompts += prompts
        return [self.texts.pop(0) for _ in prompts]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_problems_are_the_164_shipped() -> None:
    problems = load_problems()
    assert len(problems) == 164
    assert [p.task_id for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert [p.task_id for p in load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_canonical_solutions_all_pass(problems: list[Problem], tmp_path: Path) -> None:
    started = time.perf_counter()
    summary = evaluate(
        problems,
        CanonicalCompleter(problems),
        tmp_path / "samples.jsonl",
        allow_code_execution=True,
        workers=WORKERS,
        progress=False,
    )
    elapsed = time.perf_counter() - started
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    assert summary["categories"] == {"passed": 1.0}
    records = read_records(tmp_path / "samples.jsonl")
    assert sorted(r["task_id"] for r in records) == sorted(p.task_id for p in problems)
    assert all(set(r) == {"task_id", "sample", "completion", "passed", "result"} for r in records)
    print(
        f"\ncanonical check: {len(problems)} problems in {elapsed:.1f} s, {elapsed / len(problems):.3f} s/problem"
    )


def test_empty_completions_score_zero(problems: list[Problem], tmp_path: Path) -> None:
    chosen = problems[:20]
    summary = evaluate(
        chosen,
        FixedCompleter([""] * 20),
        tmp_path / "samples.jsonl",
        allow_code_execution=True,
        workers=WORKERS,
        progress=False,
    )
    assert summary["pass_at_k"] == {"pass@1": 0.0}
    assert "passed" not in summary["categories"]
    assert sum(summary["categories"].values()) == pytest.approx(1.0)


def test_wrong_return_value_fails_with_the_assertion(problems: list[Problem], tmp_path: Path) -> None:
    truncate_number = problems[2]
    evaluate(
        [truncate_number],
        FixedCompleter(["    return number\n"]),
        tmp_path / "samples.jsonl",
        allow_code_execution=True,
        progress=False,
    )
    [record] = read_records(tmp_path / "samples.jsonl")
    assert record == {
        "task_id": "HumanEval/2",
        "sample": 0,
        "completion": "    return number\n",
        "passed": False,
        "result": "failed: AssertionError: assert candidate(3.5) == 0.5 (line 23)",
    }


def test_hostile_completions_fail_and_leave_the_host_alone(
    problems: list[Problem], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOTERNARY_TEST_SECRET", "hunter2")
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    hostile = {  # body of has_close_elements -> the category its sample must be reported under
        "    while True:\n        pass\n": "timed out",
        "    import os\n    while True:\n        os.fork()\n": "TypeError",
        "    data = bytearray(10 * 1024**3)\n": "MemoryError",
        "    with open('big.bin', 'wb') as f:\n        for _ in range(1024):\n            f.write(b'x' * 2**20)\n": "OSError",
        f"    import shutil\n    shutil.rmtree({str(tmp_path)!r})\n": "TypeError",
        "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n": "TypeError",
        f"    import socket\n    socket.create_connection(('127.0.0.1', {port}))\n": "TypeError",
        "    import os\n    return os.environ['NANOTERNARY_TEST_SECRET']\n": "KeyError",
        "    print('x' * 100_000_000)\n    return True\n": "AssertionError",
    }
    summary = evaluate(
        [problems[0]],
        FixedCompleter(list(hostile)),
        tmp_path / "out" / "samples.jsonl",
        allow_code_execution=True,
        num_samples=len(hostile),
        workers=WORKERS,
        progress=False,
        limits=Limits(timeout_s=3.0),
    )
    records = sorted(read_records(tmp_path / "out" / "samples.jsonl"), key=lambda r: r["sample"])
    assert [category(r["result"]) for r in records] == list(hostile.values())
    assert [r["completion"] for r in records] == list(hostile)
    assert not any(r["passed"] for r in records)
    assert summary["pass_at_k"] == {"pass@1": 0.0}
    assert sentinel.read_text() == "keep me"
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()


def test_interrupted_run_resumes_where_it_stopped(problems: list[Problem], tmp_path: Path) -> None:
    chosen, samples = problems[:3], tmp_path / "samples.jsonl"
    first = FixedCompleter([p.canonical_solution for p in chosen for _ in range(2)])
    evaluate(chosen, first, samples, allow_code_execution=True, num_samples=2, progress=False)
    kept = samples.read_text().splitlines()[:3]
    samples.write_text("\n".join(kept) + '\n{"task_id": "HumanEv')  # killed mid-write
    done = {(r["task_id"], r["sample"]) for r in map(json.loads, kept)}
    missing = [p for p in chosen for i in range(2) if (p.task_id, i) not in done]
    second = FixedCompleter([p.canonical_solution for p in missing])
    summary = evaluate(
        chosen, second, samples, allow_code_execution=True, num_samples=2, ks=[1, 2], progress=False
    )
    assert second.prompts == [p.prompt for p in missing]
    records = read_records(samples)
    assert sorted((r["task_id"], r["sample"]) for r in records) == [
        (p.task_id, i) for p in chosen for i in range(2)
    ]
    assert (summary["executed_now"], summary["resumed"]) == (3, 3)
    assert summary["pass_at_k"] == {"pass@1": 1.0, "pass@2": 1.0}
    third = FixedCompleter([])
    assert (
        evaluate(chosen, third, samples, allow_code_execution=True, num_samples=2, progress=False)["resumed"]
        == 6
    )
    assert third.prompts == []


def test_a_run_that_dies_midway_keeps_what_it_finished(problems: list[Problem], tmp_path: Path) -> None:
    class DiesOnSecondBatch(CanonicalCompleter):
        served = False

        def generate(self, prompts: list[str]) -> list[str]:
            if self.served:
                raise EndpointError("cannot reach endpoint http://127.0.0.1:9/v1: gone")
            self.served = True
            return super().generate(prompts)

    with pytest.raises(EndpointError, match="gone"):
        evaluate(
            problems[:4],
            DiesOnSecondBatch(problems),
            tmp_path / "samples.jsonl",
            allow_code_execution=True,
            batch_size=2,
            progress=False,
        )
    assert sorted(r["task_id"] for r in read_records(tmp_path / "samples.jsonl")) == [
        "HumanEval/0",
        "HumanEval/1",
    ]


def test_running_code_needs_the_opt_in(problems: list[Problem], tmp_path: Path) -> None:
    with pytest.raises(CodeExecutionNotAllowed, match="pass allow_code_execution=true"):
        evaluate(
            problems[:1], CanonicalCompleter(problems), tmp_path / "samples.jsonl", allow_code_execution=False
        )
    assert not (tmp_path / "samples.jsonl").exists()


def test_truncate_at_the_earliest_stop_sequence() -> None:
    assert (
        truncate_at_stop("    return 1\n\n\ndef helper():\n    pass\n", STOP_SEQUENCES) == "    return 1\n\n"
    )
    assert truncate_at_stop("    x = 1\n#c\nif y:\n", STOP_SEQUENCES) == "    x = 1"
    assert truncate_at_stop("    return 1\n    # fine\n", STOP_SEQUENCES) == "    return 1\n    # fine\n"


def test_result_categories() -> None:
    assert [
        category(r)
        for r in (
            "passed",
            "timed out",
            "failed: AssertionError: assert f(1) == 2 (line 3)",
            "failed: killed by SIGSEGV",
        )
    ] == ["passed", "timed out", "AssertionError", "killed by SIGSEGV"]


class CanonicalEngine:
    """Stands in for nanoternary.infer.engine.Engine (issue 6): same generate() signature, canonical text."""

    context_length = 2048

    def __init__(self, problems: list[Problem]) -> None:
        self.solutions, self.calls = {p.prompt: p.canonical_solution for p in problems}, []

    def generate(self, prompts: list[str], **kwargs: object) -> list[SimpleNamespace]:
        self.calls.append((len(prompts), kwargs))
        return [SimpleNamespace(text=self.solutions[p], finish_reason="stop") for p in prompts]


def test_engine_completer_batches_and_passes_the_sampling_params(
    problems: list[Problem], tmp_path: Path
) -> None:
    engine = CanonicalEngine(problems)
    params = SamplingParams(max_tokens=100, temperature=0.2, top_p=0.9, top_k=40, seed=5)
    summary = evaluate(
        problems[:4],
        EngineCompleter(engine, params),
        tmp_path / "samples.jsonl",
        allow_code_execution=True,
        num_samples=2,
        batch_size=3,
        workers=WORKERS,
        progress=False,
    )
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    common = {"max_tokens": 100, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": list(STOP_SEQUENCES)}
    common["keep_last"] = 2048 - 100  # room for max_tokens new tokens
    assert engine.calls == [(3, common | {"seed": 5}), (3, common | {"seed": 6}), (2, common | {"seed": 7})]


# --- an OpenAI-compatible server on loopback -----------------------------------------------------


class StubServer(ThreadingHTTPServer):
    """Answers /v1/completions with each problem's canonical solution followed by text past a stop
    sequence (as a server that ignores `stop` would); can fail first, or cap `n`."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.answers, self.bodies, self.fail_with, self.max_n = answers, [], [], 1000

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class StubHandler(BaseHTTPRequestHandler):
    server: StubServer

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if self.path != "/v1/completions":
            return self.reply(404, {"error": {"message": f"no route {self.path}"}})
        if self.server.fail_with:
            status = self.server.fail_with.pop(0)
            return self.reply(status, {"error": {"message": f"stub says {status}"}})
        text = self.server.answers.get(body["prompt"], "    pass\n") + "\ndef leaked():\n    pass\n"
        n = min(body["n"], self.server.max_n)
        return self.reply(
            200, {"choices": [{"index": i, "text": text, "finish_reason": "stop"} for i in range(n)]}
        )

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub(problems: list[Problem]) -> Iterator[StubServer]:
    server = StubServer({p.prompt: p.canonical_solution for p in problems})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_endpoint_samples_score_and_send_the_sampling_params(
    problems: list[Problem], stub: StubServer, tmp_path: Path
) -> None:
    params = SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, seed=7)
    completer = EndpointCompleter(stub.url, params, backoff_s=0.01)
    summary = evaluate(
        problems[:4],
        completer,
        tmp_path / "samples.jsonl",
        allow_code_execution=True,
        num_samples=2,
        ks=[1, 2, 10],
        workers=WORKERS,
        progress=False,
    )
    assert summary["pass_at_k"] == {"pass@1": 1.0, "pass@2": 1.0}
    assert stub.bodies == [
        {
            "model": "nanoternary",
            "prompt": p.prompt,
            "max_tokens": 64,
            "temperature": 0.8,
            "top_p": 0.95,
            "n": 2,
            "stop": list(STOP_SEQUENCES),
            "seed": 7 + i,
        }
        for i, p in enumerate(problems[:4])
    ]


def test_endpoint_retries_server_errors(stub: StubServer) -> None:
    stub.fail_with = [503, 500, 429]
    assert EndpointCompleter(stub.url, SamplingParams(), backoff_s=0.01).generate(["x"]) == [
        "    pass\n\ndef leaked():\n    pass\n"
    ]
    assert len(stub.bodies) == 4


def test_endpoint_gives_up_after_the_retries(stub: StubServer) -> None:
    stub.fail_with = [503] * 3
    with pytest.raises(EndpointError, match=r"/v1/completions answered 503: .*stub says 503"):
        EndpointCompleter(stub.url, SamplingParams(), retries=2, backoff_s=0.01).generate(["x"])
    assert len(stub.bodies) == 3


def test_endpoint_does_not_retry_a_bad_request(stub: StubServer) -> None:
    stub.fail_with = [400]
    with pytest.raises(EndpointError, match=r"answered 400: .*stub says 400"):
        EndpointCompleter(stub.url, SamplingParams(), backoff_s=0.01).generate(["x"])
    assert len(stub.bodies) == 1


def test_endpoint_asks_again_when_the_server_caps_n(stub: StubServer) -> None:
    stub.max_n = 1
    assert len(EndpointCompleter(stub.url, SamplingParams()).generate(["x", "x", "x", "y"])) == 4
    assert [(b["prompt"], b["n"], b["seed"]) for b in stub.bodies] == [
        ("x", 3, 1234),
        ("x", 2, 1235),
        ("x", 1, 1236),
        ("y", 1, 1237),
    ]


def test_endpoint_down_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    completer = EndpointCompleter(f"http://127.0.0.1:{port}/v1", SamplingParams(), retries=1, backoff_s=0.01)
    with pytest.raises(EndpointError, match=rf"^cannot reach endpoint http://127.0.0.1:{port}/v1: "):
        completer.generate(["x"])


# --- the CLI ------------------------------------------------------------------------------------


def eval_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "nanoternary.cli.eval",
            f"hydra.run.dir={tmp_path}",
            "progress=false",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_against_an_endpoint_writes_results_and_prints_the_table(
    stub: StubServer, tmp_path: Path
) -> None:
    done = eval_cli(
        tmp_path,
        f"endpoint={stub.url}",
        "allow_code_execution=true",
        "task.limit=3",
        "task.num_samples=2",
        "http.backoff_s=0.01",
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["pass_at_k"], summary["problems"], summary["source"]) == ({"pass@1": 1.0}, 3, stub.url)
    assert len(read_records(tmp_path / "samples.jsonl")) == 6
    assert "pass@1" in done.stdout and "100.00%" in done.stdout


def test_cli_against_our_server_with_a_tiny_model(tmp_path: Path) -> None:
    """End to end: nanoternary-serve on loopback with a random tiny model (its context long enough for
    HumanEval's prompts), the eval CLI sampling from it and running what comes back. The score is whatever
    it is; the files and the table must be right."""
    model = build_tiny_model(tmp_path / "model", replace(TINY, context_length=1024))
    native_ops()  # built here under the test timeout, if no earlier test did, not in the server's start
    server = ServerProcess(model, "threads=1", f"api_key={API_KEY}")
    try:
        done = eval_cli(
            tmp_path / "run",
            f"endpoint={server.url}/v1",
            f"http.api_key={API_KEY}",
            "allow_code_execution=true",
            "task.limit=3",
            "task.num_samples=2",
            "task.max_tokens=24",
            "task.temperature=0.8",
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    records = read_records(tmp_path / "run" / "samples.jsonl")
    assert sorted((r["task_id"], r["sample"]) for r in records) == [
        (f"HumanEval/{i}", s) for i in range(3) for s in range(2)
    ]
    for r in records:
        assert set(r) == {"task_id", "sample", "completion", "passed", "result"}
        assert isinstance(r["completion"], str) and r["passed"] == (r["result"] == "passed")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["problems"], summary["source"]) == (3, f"{server.url}/v1")
    passed = sum(r["passed"] for r in records)
    assert summary["pass_at_k"]["pass@1"] == pytest.approx(passed / 6)
    assert "pass@1" in done.stdout


def test_cli_refuses_without_the_opt_in(tmp_path: Path) -> None:
    done = eval_cli(tmp_path, "canonical=true")
    assert done.returncode == 1
    assert done.stderr.startswith("error: HumanEval runs model-generated code on this machine")
    assert not (tmp_path / "samples.jsonl").exists()


def test_cli_wants_exactly_one_source(tmp_path: Path) -> None:
    done = eval_cli(tmp_path, "canonical=true", "endpoint=http://127.0.0.1:9/v1", "allow_code_execution=true")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: name exactly one of model=<path>, endpoint=<url>, canonical=true (got ['endpoint', 'canonical'])"
    )
