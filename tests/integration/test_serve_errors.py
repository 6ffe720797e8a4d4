"""Bad requests against a real server with small limits: each gets its own 4xx and OpenAI-style error
object, the server keeps answering afterwards, a full queue answers 503 + Retry-After, and SIGTERM lets a
running stream finish before the process exits."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from nanoternary.serve.launch import ServerProcess
from tests.serve_server import API_KEY

MAX_BODY, MAX_TOKENS, MAX_N = 4096, 64, 4
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tiny_model,
        "threads=1",
        f"api_key={API_KEY}",
        f"limits.max_body_bytes={MAX_BODY}",
        f"limits.max_tokens={MAX_TOKENS}",
        f"limits.max_n={MAX_N}",
        "limits.max_batch=2",
        "limits.max_queue=1",
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def completion(**fields) -> dict:
    return {"model": "model", "prompt": "def f(", "max_tokens": 4, **fields}


CASES = [  # (name, path, raw body or JSON, status, type, param, message part)
    (
        "malformed JSON",
        "/v1/completions",
        b'{"prompt": "x",',
        400,
        "invalid_request_error",
        None,
        "request body is not valid JSON: Expecting property name enclosed in double quotes",
    ),
    (
        "not an object",
        "/v1/completions",
        b"[1, 2]",
        400,
        "invalid_request_error",
        None,
        "request body must be a JSON object, got list",
    ),
    (
        "invalid UTF-8",
        "/v1/completions",
        b'{"prompt": "caf\xe9"}',
        400,
        "invalid_request_error",
        None,
        "request body is not valid UTF-8: bad byte at position 15",
    ),
    (
        "lone surrogate",
        "/v1/completions",
        b'{"prompt": "\\ud800"}',
        400,
        "invalid_request_error",
        None,
        "unpaired UTF-16 surrogate",
    ),
    (
        "NaN",
        "/v1/completions",
        b'{"prompt": "x", "temperature": NaN}',
        400,
        "invalid_request_error",
        "temperature",
        "temperature: Input should be a finite number",
    ),
    (
        "string max_tokens",
        "/v1/completions",
        completion(max_tokens="10"),
        400,
        "invalid_request_error",
        "max_tokens",
        "max_tokens: Input should be a valid integer",
    ),
    (
        "bool n",
        "/v1/completions",
        completion(n=True),
        400,
        "invalid_request_error",
        "n",
        "n: Input should be a valid integer",
    ),
    (
        "number prompt",
        "/v1/completions",
        completion(prompt=5),
        400,
        "invalid_request_error",
        "prompt",
        "prompt: must be a string, an array of strings, an array of token ids or an array of token-id arrays",
    ),
    (
        "missing prompt",
        "/v1/completions",
        {"model": "model"},
        400,
        "invalid_request_error",
        "prompt",
        "'prompt' is a required property",
    ),
    (
        "messages not a list",
        "/v1/chat/completions",
        {"messages": "hi"},
        400,
        "invalid_request_error",
        "messages",
        "messages: Input should be a valid list",
    ),
    (
        "unknown role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        "invalid_request_error",
        "messages.0.role",
        "messages.0.role: Input should be 'system', 'developer'",
    ),
    (
        "no messages",
        "/v1/chat/completions",
        {"messages": []},
        400,
        "invalid_request_error",
        "messages",
        "messages: List should have at least 1 item",
    ),
    (
        "image part",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "invalid_request_error",
        "messages.0.content",
        "images and audio are not supported",
    ),
    (
        "unknown model",
        "/v1/completions",
        completion(model="gpt-4"),
        404,
        "invalid_request_error",
        "model",
        "The model 'gpt-4' does not exist; this server serves 'model'",
    ),
    (
        "negative max_tokens",
        "/v1/completions",
        completion(max_tokens=-1),
        400,
        "invalid_request_error",
        "max_tokens",
        "max_tokens: Input should be greater than or equal to 0",
    ),
    (
        "huge max_tokens",
        "/v1/completions",
        completion(max_tokens=10**30),
        400,
        "invalid_request_error",
        "max_tokens",
        f"max_tokens must be at most {MAX_TOKENS}, got {10**30}",
    ),
    (
        "huge max_completion_tokens",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 65},
        400,
        "invalid_request_error",
        "max_completion_tokens",
        f"max_completion_tokens must be at most {MAX_TOKENS}",
    ),
    (
        "empty prompt",
        "/v1/completions",
        completion(prompt=""),
        400,
        "invalid_request_error",
        "prompt",
        "prompt must not be empty",
    ),
    (
        "empty token prompt",
        "/v1/completions",
        completion(prompt=[[]]),
        400,
        "invalid_request_error",
        "prompt",
        "prompt must not be empty",
    ),
    (
        "token id out of range",
        "/v1/completions",
        completion(prompt=[1, 99999]),
        400,
        "invalid_request_error",
        "prompt",
        "prompt has token ids outside [0, 512)",
    ),
    (
        "prompt too long",
        "/v1/completions",
        completion(prompt="a " * 300),
        400,
        "invalid_request_error",
        "prompt",
        "this server accepts at most 128 (the model's context length is 128)",
    ),
    (
        "n too large",
        "/v1/completions",
        completion(n=MAX_N + 1),
        400,
        "invalid_request_error",
        "n",
        f"n must be at most {MAX_N}, got {MAX_N + 1}",
    ),
    (
        "more sequences than the server holds",
        "/v1/completions",
        completion(n=MAX_N),
        400,
        "invalid_request_error",
        None,
        "this request needs 4 sequences (prompts x n); the server holds at most 3",
    ),
    (
        "temperature out of range",
        "/v1/completions",
        completion(temperature=3),
        400,
        "invalid_request_error",
        "temperature",
        "temperature: Input should be less than or equal to 2",
    ),
    (
        "empty stop",
        "/v1/completions",
        completion(stop=[""]),
        400,
        "invalid_request_error",
        "stop",
        "stop: stop strings must not be empty",
    ),
    (
        "too many stops",
        "/v1/completions",
        completion(stop=[str(i) for i in range(17)]),
        400,
        "invalid_request_error",
        "stop",
        "at most 16 stop strings are allowed, got 17",
    ),
    (
        "penalty",
        "/v1/completions",
        completion(presence_penalty=0.5),
        400,
        "invalid_request_error",
        None,
        "presence_penalty is not supported by this server (leave it at 0)",
    ),
    (
        "stream logprobs",
        "/v1/completions",
        completion(stream=True, logprobs=1),
        400,
        "invalid_request_error",
        None,
        "logprobs are only available without stream",
    ),
    (
        "tools",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{}]},
        400,
        "invalid_request_error",
        None,
        "tools (function calling) are not supported by this server",
    ),
    (
        "oversized body",
        "/v1/completions",
        completion(prompt="x" * MAX_BODY),
        413,
        "invalid_request_error",
        None,
        f"request body is larger than the limit of {MAX_BODY} bytes",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "param", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(
    http: httpx.Client, path: str, body, status: int, kind: str, param, message: str
) -> None:
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    else:
        response = http.post(path, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["type"], error["param"]) == (kind, param)
    assert message in error["message"]


def test_api_key(http: httpx.Client, server: ServerProcess) -> None:
    missing = http.post("/v1/completions", json=completion())
    assert missing.status_code == 401
    assert error_of(missing) == {
        "message": "missing API key: send the header 'Authorization: Bearer <key>'",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and error_of(wrong)["message"] == "incorrect API key"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        client.completions.create(model="model", prompt="x", max_tokens=1)
    assert http.get("/health").status_code == 200  # no key needed: load balancers probe it


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    missing = http.get("/v1/engines", headers=AUTH)
    assert missing.status_code == 404 and error_of(missing)["message"] == "unknown route GET /v1/engines"
    wrong = http.get("/v1/completions", headers=AUTH)
    assert wrong.status_code == 405
    assert error_of(wrong)["message"] == "method GET is not allowed on /v1/completions"


def test_huge_declared_body_is_refused_before_reading(server: ServerProcess) -> None:
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n{"
        )
        reply = b""
        while chunk := sock.recv(65536):  # the server answers and closes: it will not read a gigabyte
            reply += chunk
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert (
        json.loads(body)["error"]["message"] == f"request body is larger than the limit of {MAX_BODY} bytes"
    )


def test_official_client_sees_typed_errors(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at most 64"):
        client.completions.create(model="model", prompt="x", max_tokens=1000)


def test_full_queue_answers_503_with_retry_after(server: ServerProcess, http: httpx.Client) -> None:
    """The server holds 2 + 1 sequences; 12 long requests at once: some wait their turn and succeed,
    the rest are told to come back later, and nothing else breaks."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = completion(max_tokens=MAX_TOKENS, temperature=0)
            return await asyncio.gather(
                *(client.post("/v1/completions", json=body, headers=AUTH) for _ in range(12))
            )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) >= 3, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1"
    assert (
        error_of(busy)["type"] == "server_error" and "the server is at capacity" in error_of(busy)["message"]
    )
    texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # greedy: every request that ran got the same, complete answer
    health = http.get("/health").json()
    assert (health["batch"]["active"], health["batch"]["waiting"]) == (0, 0)


def test_server_still_answers(server: ServerProcess, http: httpx.Client) -> None:
    assert server.proc.poll() is None
    response = http.post("/v1/completions", json=completion(max_tokens=3, temperature=0), headers=AUTH)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def test_sigterm_drains_running_streams(tiny_model: Path) -> None:
    """SIGTERM while a stream runs: the stream still ends with [DONE], new connections are refused,
    and the process exits once it has drained."""
    proc = ServerProcess(tiny_model, "threads=1")
    try:
        lines: list[str] = []
        first = threading.Event()

        def read() -> None:
            body = {"prompt": "def f(", "max_tokens": 120, "temperature": 0, "stream": True}
            with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60)
        code = proc.terminate()
        reader.join(60)
        assert code == -signal.SIGTERM  # uvicorn re-raises the signal once it has drained
        assert lines[-1] == "data: [DONE]"
        finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines if x.startswith("data: {")]
        assert finals[-1] == "length"
        with pytest.raises(httpx.ConnectError):
            httpx.get(proc.url + "/health", timeout=5)
        assert "Finished server process" in proc.log()
    finally:
        proc.stop()
