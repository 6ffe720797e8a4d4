"""Turning a request's scheduler events into OpenAI responses: whole (JSON) or streamed (SSE).

A stream sends every choice's text as it becomes safe to send (complete UTF-8 characters, no part of a
stop string), then one chunk per choice with its finish_reason, optionally a usage chunk, and
`data: [DONE]`. A client that goes away cancels its generation: a stream notices at once (its generator
is closed), a plain request within DISCONNECT_POLL_S.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from nanoternary.serve.errors import APIError
from nanoternary.serve.logprobs import TokenScore, TokenText, chat_logprobs, completion_logprobs
from nanoternary.serve.scheduler import Event, Job
from nanoternary.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

DISCONNECT_POLL_S = 0.5
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, but the log says what happened


@dataclass
class ReplyContext:
    """What every response of one request shares."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    request: Request
    names: TokenText


@dataclass
class ChoiceResult:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    scores: list[TokenScore] = field(default_factory=list)


def usage(ctx: ReplyContext, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=ctx.prompt_tokens + completion_tokens,
    )


def failure(event: Event) -> APIError:
    return APIError(500, event.error or "generation failed", kind="server_error")


async def gather(job: Job, ctx: ReplyContext, size: int) -> list[ChoiceResult] | None:
    """Every choice's full result; None when the client disconnected (its generation is cancelled)."""
    results = [ChoiceResult() for _ in range(size)]
    try:
        while job.unfinished:
            events = await job.next(DISCONNECT_POLL_S)
            if events is None:
                if await ctx.request.is_disconnected():
                    return None
                continue
            for e in events:
                if e.error:
                    raise failure(e)
                r = results[e.index]
                r.text += e.text
                r.scores += e.scores
                if e.finish_reason:
                    r.finish_reason, r.completion_tokens = e.finish_reason, e.completion_tokens
    finally:
        job.cancel()  # a no-op when it finished
    return results


async def completion_reply(job: Job, ctx: ReplyContext, echo: list[str]) -> Response:
    results = await gather(job, ctx, len(echo))
    if results is None:
        return Response(status_code=CLIENT_GONE)
    choices = [
        CompletionChoice(
            index=i,
            text=echo[i] + r.text,
            finish_reason=r.finish_reason,
            logprobs=completion_logprobs(r.scores, ctx.names) if job.wants_logprobs else None,
        )
        for i, r in enumerate(results)
    ]
    reply = CompletionResponse(
        id=ctx.id,
        created=ctx.created,
        model=ctx.model,
        choices=choices,
        usage=usage(ctx, sum(r.completion_tokens for r in results)),
    )
    return JSONResponse(reply.model_dump())


async def chat_reply(job: Job, ctx: ReplyContext) -> Response:
    results = await gather(job, ctx, job.size)
    if results is None:
        return Response(status_code=CLIENT_GONE)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            finish_reason=r.finish_reason,
            logprobs=chat_logprobs(r.scores, ctx.names) if job.wants_logprobs else None,
        )
        for i, r in enumerate(results)
    ]
    reply = ChatCompletionResponse(
        id=ctx.id,
        created=ctx.created,
        model=ctx.model,
        choices=choices,
        usage=usage(ctx, sum(r.completion_tokens for r in results)),
    )
    return JSONResponse(reply.model_dump())


def sse(data: BaseModel | str) -> str:
    return f"data: {data if isinstance(data, str) else data.model_dump_json()}\n\n"


def event_stream(
    job: Job,
    ctx: ReplyContext,
    opening: list[BaseModel],
    chunks: Callable[[Event], list[BaseModel]],
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> StreamingResponse:
    """SSE: the `opening` chunks, `chunks(event)` for every event, the usage chunk if asked, [DONE]."""

    async def body() -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            for chunk in opening:
                yield sse(chunk)
            while job.unfinished:
                for event in await job.next() or []:
                    if event.error:
                        yield sse(failure(event).response().body.decode())
                        return
                    completion_tokens += event.completion_tokens if event.finish_reason else 0
                    for chunk in chunks(event):
                        yield sse(chunk)
            if usage_chunk is not None:
                yield sse(usage_chunk(usage(ctx, completion_tokens)))
            yield sse("[DONE]")
        finally:
            job.cancel()  # the client went away (the generator is closed early) or we are done

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def completion_stream(job: Job, ctx: ReplyContext, echo: list[str], include_usage: bool) -> StreamingResponse:
    def chunk(index: int, text: str, finish_reason: str | None = None) -> CompletionResponse:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason)
        return CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=[choice])

    def chunks(event: Event) -> list[BaseModel]:
        out = [chunk(event.index, event.text)] if event.text else []
        return out + ([chunk(event.index, "", event.finish_reason)] if event.finish_reason else [])

    def usage_chunk(u: Usage) -> BaseModel:
        return CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=[], usage=u)

    opening = [chunk(i, text) for i, text in enumerate(echo) if text]
    return event_stream(job, ctx, opening, chunks, usage_chunk if include_usage else None)


def chat_stream(job: Job, ctx: ReplyContext, include_usage: bool) -> StreamingResponse:
    def chunk(index: int, delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model, choices=[choice])

    def chunks(event: Event) -> list[BaseModel]:
        out = [chunk(event.index, ChatDelta(content=event.text))] if event.text else []
        return out + ([chunk(event.index, ChatDelta(), event.finish_reason)] if event.finish_reason else [])

    def usage_chunk(u: Usage) -> BaseModel:
        return ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model, choices=[], usage=u)

    opening = [chunk(i, ChatDelta(role="assistant", content="")) for i in range(job.size)]
    return event_stream(job, ctx, opening, chunks, usage_chunk if include_usage else None)
