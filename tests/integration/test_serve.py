"""The OpenAI-compatible server end to end: a real `nanoternary-serve` process on loopback, driven by the
official `openai` client, its answers checked token for token against the in-process engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import openai
import pytest
import torch

from nanoternary.infer.engine import Completion, Engine
from nanoternary.model.transformer import TernaryLM
from nanoternary.serve.chat_template import DEFAULT_STOP, DEFAULT_TEMPLATE, ChatTemplate, load_chat_template
from nanoternary.serve.launch import ServerProcess
from tests.serve_server import API_KEY, CHAT_STOP, CHAT_TEMPLATE, TINY

PROMPTS = ["def foo(", "import re\n", "héllo wörld", "class A:"]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[Engine]:
    """The reference: the same model in this process (one thread, like the server: on a busy machine a
    second thread makes a model this small ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.from_path(tiny_model)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def reference(engine: Engine, prompt: str, **kwargs) -> Completion:
    return engine.generate([prompt], **kwargs)[0]


def chat_prompt(messages: list[dict[str, str]]) -> str:
    return ChatTemplate(CHAT_TEMPLATE, "test").render(messages)


def test_health_and_models(server: ServerProcess, client: openai.OpenAI, engine: Engine) -> None:
    health = server.get("/health")
    assert health["status"] == "ok"
    assert health["model"] == engine.name == "model"
    assert health["parameters"] == TernaryLM(TINY).num_parameters()
    assert health["context_length"] == TINY.context_length
    assert health["chat_template"] == "meta.json"
    assert 0 < health["load_time_s"] < 60
    assert [m.id for m in client.models.list().data] == ["model"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_engine(client: openai.OpenAI, engine: Engine, prompt: str) -> None:
    ref = reference(engine, prompt, max_tokens=24)
    out = client.completions.create(model="model", prompt=prompt, max_tokens=24, temperature=0)
    assert out.object == "text_completion" and out.model == "model" and len(out.choices) == 1
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason == "length"
    assert out.usage.prompt_tokens == len(engine.tokenizer.encode(prompt)) == ref.prompt_tokens
    assert out.usage.completion_tokens == ref.completion_tokens == 24
    assert out.usage.total_tokens == out.usage.prompt_tokens + 24


def test_sampled_stream_equals_engine_and_plain_reply(client: openai.OpenAI, engine: Engine) -> None:
    """Same seed, same text: streamed deltas join to the non-streamed text, which is the engine's."""
    settings = dict(max_tokens=40, temperature=0.9, top_p=0.95, seed=7)
    ref = reference(engine, PROMPTS[2], top_k=50, **settings)
    plain = client.completions.create(model="model", prompt=PROMPTS[2], extra_body={"top_k": 50}, **settings)
    chunks = list(
        client.completions.create(
            model="model",
            prompt=PROMPTS[2],
            extra_body={"top_k": 50},
            stream=True,
            stream_options={"include_usage": True},
            **settings,
        )
    )
    assert plain.choices[0].text == ref.text
    deltas = [c.choices[0].text for c in chunks if c.choices]
    assert len(deltas) > 5 and "".join(deltas) == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert plain.usage.completion_tokens == ref.completion_tokens


def test_stream_with_n_and_echo(client: openai.OpenAI) -> None:
    """Several choices interleave in one stream; each one's echoed prompt and deltas add up to its text."""
    kwargs = dict(model="model", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, seed=21, n=2, echo=True)
    plain = client.completions.create(**kwargs)
    streamed = ["", ""]
    for chunk in client.completions.create(stream=True, **kwargs):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [c.text for c in plain.choices]
    assert all(t.startswith(PROMPTS[0]) and len(t) > len(PROMPTS[0]) for t in streamed)
    assert streamed[0] != streamed[1]


def test_stream_never_splits_utf8(server: ServerProcess, engine: Engine) -> None:
    """This sample spells "Б" with two byte tokens; the raw SSE stream must deliver it whole (a split
    would show up as two replacement characters), and the deltas must add up to the engine's text."""
    body = {"prompt": "héllo wörld ✓", "max_tokens": 60, "temperature": 1.0, "seed": 5, "stream": True}
    ref = reference(engine, body["prompt"], max_tokens=60, temperature=1.0, seed=5)
    assert "Б" in ref.text and not any("Б" in engine.tokenizer.decode([t]) for t in ref.token_ids)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        raw = b"".join(r.iter_raw())
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    deltas = [
        json.loads(e.removeprefix(b"data: ").decode("utf-8"))["choices"][0]["text"] for e in events[:-1]
    ]
    assert "".join(deltas) == ref.text
    assert any("Б" in d for d in deltas)


def test_chat_uses_the_models_template(client: openai.OpenAI, engine: Engine) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    prompt = chat_prompt(messages)
    assert prompt == "<system>be brief</system>\n<user>hi there</user>\n<assistant>"
    ref = reference(engine, prompt, max_tokens=20, stop=CHAT_STOP)
    out = client.chat.completions.create(model="model", messages=messages, max_tokens=20, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert out.usage.completion_tokens == ref.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="model", messages=messages, max_tokens=20, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_stop_strings_cut_and_report_stop(client: openai.OpenAI, engine: Engine) -> None:
    full = reference(engine, PROMPTS[1], max_tokens=30).text
    stop = full[10:13]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model="model",
            prompt=PROMPTS[1],
            max_tokens=30,
            temperature=0,
            stop=[stop, "never appears"],
            stream=stream,
        )
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")
    out = client.completions.create(model="model", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=stop)
    assert out.choices[0].text == cut


def test_n_seed_echo_and_token_prompts(client: openai.OpenAI, engine: Engine) -> None:
    kwargs = dict(model="model", max_tokens=12, temperature=1.0, seed=11)
    three = client.completions.create(prompt=PROMPTS[0], n=3, **kwargs)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.text for c in three.choices]
    assert texts == [
        reference(engine, PROMPTS[0], max_tokens=12, temperature=1.0, seed=11 + k).text for k in range(3)
    ]
    assert len(set(texts)) == 3
    assert three.usage.prompt_tokens == len(
        engine.tokenizer.encode(PROMPTS[0])
    )  # counted once, not per choice
    assert three.usage.completion_tokens == sum(
        reference(engine, PROMPTS[0], max_tokens=12, temperature=1.0, seed=11 + k).completion_tokens
        for k in range(3)
    )
    again = client.completions.create(prompt=PROMPTS[0], n=3, **kwargs)
    assert [c.text for c in again.choices] == texts

    batch = client.completions.create(
        model="model", prompt=PROMPTS[:2], max_tokens=8, temperature=0, echo=True
    )
    assert [c.text for c in batch.choices] == [
        p + reference(engine, p, max_tokens=8).text for p in PROMPTS[:2]
    ]
    ids = engine.tokenizer.encode(PROMPTS[3])
    by_ids = client.completions.create(model="model", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == reference(engine, PROMPTS[3], max_tokens=8).text


def test_max_tokens_zero_and_default_alias(client: openai.OpenAI) -> None:
    out = client.completions.create(model="nanoternary", prompt="x", max_tokens=0)
    assert (out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens) == (
        "",
        "length",
        0,
    )
    assert out.model == "model"  # "nanoternary" is an alias of the served model


def test_logprobs(client: openai.OpenAI, engine: Engine) -> None:
    out = client.completions.create(
        model="model", prompt=PROMPTS[3], max_tokens=10, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == 10
    )
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # tokens that print alike share a key
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and logprob == pytest.approx(max(top.values()))  # greedy took the best token
    assert lp.text_offset[0] == 0

    chat = client.chat.completions.create(
        model="model",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(
        len(c.top_logprobs) == 2 and c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content
    )
    raw = b"".join(bytes(c.bytes) for c in content)
    assert raw.decode("utf-8", errors="replace").startswith(chat.choices[0].message.content)


def test_32_concurrent_streams_and_a_disconnect(server: ServerProcess, engine: Engine) -> None:
    """32 clients stream at once, each gets exactly its own sampled text; one more hangs up after its
    first chunk, and its generation stops instead of running to its max_tokens."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    n_tokens, long, hung_up_seed = 16, 120, 100
    left_alone = reference(engine, PROMPTS[0], max_tokens=long, temperature=1.0, seed=hung_up_seed)
    assert left_alone.finish_reason == "length" and hung_up_seed % 4 == 0

    async def stream(client: httpx.AsyncClient, seed: int, max_tokens: int, hang_up: bool) -> str:
        body = {
            "prompt": PROMPTS[seed % 4],
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": seed,
            "stream": True,
        }
        text = ""
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if hang_up:
                        return text
                if line == "data: [DONE]":
                    return text + "[DONE]"
        return text

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            jobs = [stream(client, seed, n_tokens, False) for seed in range(32)]
            return await asyncio.gather(stream(client, hung_up_seed, long, True), *jobs)

    before = server.get("/health")["tokens_sampled"]
    _, *texts = asyncio.run(run())
    refs = [
        reference(engine, PROMPTS[s % 4], max_tokens=n_tokens, temperature=1.0, seed=s) for s in range(32)
    ]
    assert texts == [r.text + "[DONE]" for r in refs]
    health = server.get("/health")
    assert health["batch"] == {**health["batch"], "active": 0, "waiting": 0}
    sampled_by_hung_up = (
        health["tokens_sampled"]
        - before
        - sum(r.completion_tokens + (r.finish_reason == "stop") for r in refs)
    )
    assert 1 <= sampled_by_hung_up < long  # uncancelled, it would have run to `long` by now


def test_chat_template_sources(tmp_path: Path) -> None:
    """meta.json's template wins, then a GGUF's tokenizer.chat_template, then the documented default."""
    template = load_chat_template("unused", {})
    assert (template.source, template.origin, template.stop) == (DEFAULT_TEMPLATE, "default", DEFAULT_STOP)
    text = template.render([{"role": "user", "content": "Write fib."}])
    assert text == "### user\nWrite fib.\n\n### assistant\n"
    custom = load_chat_template("unused", {"chat_template": "{{ messages[0].content }}|", "chat_stop": ["|"]})
    assert (custom.render([{"role": "user", "content": "a"}]), custom.stop, custom.origin) == (
        "a|",
        ("|",),
        "meta.json",
    )
    with pytest.raises(ValueError, match="invalid chat template from meta.json"):
        load_chat_template("unused", {"chat_template": "{% for %}"})
    writer = gguf.GGUFWriter(tmp_path / "chat.gguf", "nanoternary")
    writer.add_chat_template("{{ messages[0].content }}!")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from_gguf = load_chat_template(tmp_path / "chat.gguf", {})
    assert (from_gguf.origin, from_gguf.stop) == ("gguf:tokenizer.chat_template", ())
    assert from_gguf.render([{"role": "user", "content": "a"}]) == "a!"
    strict = ChatTemplate("{{ raise_exception('only user turns') }}", "test")
    with pytest.raises(ValueError, match="only user turns"):
        strict.render([])
