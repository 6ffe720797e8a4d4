"""The OpenAI-compatible HTTP server: `create_app(model_path, settings)` -> a FastAPI app for uvicorn.

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming with SSE or not), GET /v1/models,
GET /health, and GET / (the chat page). Generation runs in the `Scheduler`'s thread, which batches every
request in flight into shared forward passes; handlers only validate, submit and relay events.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoternary.infer.engine import Engine
from nanoternary.infer.sampling import SamplingParams
from nanoternary.serve.chat_template import ChatTemplate, load_chat_template
from nanoternary.serve.errors import APIError, parse_json, read_body, validate
from nanoternary.serve.logprobs import TokenText
from nanoternary.serve.responses import (
    ReplyContext,
    chat_reply,
    chat_stream,
    completion_reply,
    completion_stream,
)
from nanoternary.serve.scheduler import ChoiceSpec, Job, QueueFull, Scheduler, ShuttingDown
from nanoternary.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)

log = logging.getLogger(__name__)
CHAT_PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much work the server holds at once.

    None for max_prompt_tokens / max_tokens means the model's context length (the engine cannot go
    further anyway).
    """

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_n: int = 16
    max_prompts: int = 16
    max_batch: int = 32  # sequences in one forward pass
    max_queue: int = 256  # sequences waiting for a place in the batch; beyond that: 503
    retry_after_s: int = 1


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None
    aliases: tuple[str, ...] = ("nanoternary",)  # model names accepted besides the served one
    limits: Limits = field(default_factory=Limits)
    drain_timeout_s: float = 30.0  # on shutdown, how long running generations may take to finish


class Server:
    """The loaded model with its template and scheduler, and the request checks that need them."""

    def __init__(self, engine: Engine, template: ChatTemplate, settings: ServeSettings, load_time_s: float):
        self.engine, self.template, self.settings, self.load_time_s = engine, template, settings, load_time_s
        limits = settings.limits
        self.scheduler = Scheduler(engine, limits.max_batch, limits.max_queue)
        self.names = TokenText(engine.tokenizer)
        self.started = time.time()
        ctx = engine.context_length
        self.max_prompt_tokens = min(ctx, limits.max_prompt_tokens or ctx)
        self.max_tokens = limits.max_tokens or ctx

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.engine.name and name not in self.settings.aliases:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.engine.name}'",
                param="model",
                code="model_not_found",
            )

    def check_counts(self, prompts: int, n: int) -> None:
        limits = self.settings.limits
        if n > limits.max_n:
            raise APIError(400, f"n must be at most {limits.max_n}, got {n}", param="n")
        if prompts > limits.max_prompts:
            raise APIError(
                400, f"at most {limits.max_prompts} prompts per request, got {prompts}", param="prompt"
            )

    def check_max_tokens(self, max_tokens: int | None, param: str = "max_tokens") -> int:
        if max_tokens is None:
            return self.engine.context_length
        if max_tokens > self.max_tokens:
            raise APIError(400, f"{param} must be at most {self.max_tokens}, got {max_tokens}", param=param)
        return max_tokens

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a prompt (text, or ids given by the client), within the prompt limits."""
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise APIError(400, f"{param} must not be empty", param=param)
        if len(ids) > self.max_prompt_tokens:
            raise APIError(
                400,
                f"{param} is {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens} "
                f"(the model's context length is {self.engine.context_length})",
                param=param,
                code="context_length_exceeded",
            )
        vocab = self.engine.cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"{param} has token ids outside [0, {vocab})", param=param)
        return ids

    def submit(
        self, prompts: list[list[int]], req: SamplingFields, max_tokens: int, stop: list[str], top: int | None
    ) -> Job:
        """Queue n choices per prompt; choice k (prompt k // n) samples with seed + k when a seed is given."""
        specs = []
        for k in range(len(prompts) * req.n):
            seed = None if req.seed is None else req.seed + k
            params = SamplingParams(max_tokens, req.temperature, req.top_p, req.top_k, list(stop), seed)
            specs.append(ChoiceSpec(prompts[k // req.n], params, top))
        capacity = self.settings.limits.max_batch + self.settings.limits.max_queue
        if len(specs) > capacity:
            raise APIError(
                400,
                f"this request needs {len(specs)} sequences (prompts x n); the server holds at most {capacity}",
            )
        try:
            return self.scheduler.submit(specs)
        except (QueueFull, ShuttingDown) as exc:
            retry = str(self.settings.limits.retry_after_s)
            raise APIError(
                503, str(exc), kind="server_error", code="overloaded", headers={"Retry-After": retry}
            ) from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from exc

    def context(self, prefix: str, prompts: list[list[int]], request: Request) -> ReplyContext:
        return ReplyContext(
            id=f"{prefix}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.engine.name,
            prompt_tokens=sum(len(p) for p in prompts),
            request=request,
            names=self.names,
        )

    def health(self) -> dict:
        active, waiting = self.scheduler.load
        limits = self.settings.limits
        return {
            "status": "ok",
            "model": self.engine.name,
            "parameters": self.engine.num_parameters,
            "context_length": self.engine.context_length,
            "device": str(self.engine.device),
            "backend": self.engine.backend,
            "load_time_s": round(self.load_time_s, 3),
            "uptime_s": round(time.time() - self.started, 3),
            "chat_template": self.template.origin,
            "batch": {
                "active": active,
                "waiting": waiting,
                "max_batch": limits.max_batch,
                "max_queue": limits.max_queue,
            },
            "forward_passes": self.scheduler.steps,
            "tokens_sampled": self.scheduler.sampled,
        }


def create_app(model_path: str | Path, settings: ServeSettings | None = None, device: str = "cpu") -> FastAPI:
    """Load the model at `model_path` (export folder or .gguf) and build the app that serves it."""
    settings = settings or ServeSettings()
    started = time.perf_counter()
    engine = Engine.from_path(model_path, device=device)
    template = load_chat_template(model_path, engine.meta)
    server = Server(engine, template, settings, time.perf_counter() - started)
    log.info("loaded %s (%d parameters) in %.2f s", engine.name, engine.num_parameters, server.load_time_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        await asyncio.to_thread(server.scheduler.stop, settings.drain_timeout_s)

    app = FastAPI(title="nanoternary", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_error_handlers(app)
    app.include_router(
        api_routes(server), prefix="/v1", dependencies=[Depends(api_key_check(settings.api_key))]
    )

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    return app


def api_routes(server: Server) -> APIRouter:
    """/v1/*: each handler validates, submits to the scheduler last (nothing can fail after it), replies."""
    router = APIRouter()
    max_body = server.settings.limits.max_body_bytes

    @router.get("/models")
    async def models() -> dict:
        return ModelList(data=[ModelCard(id=server.engine.name, created=int(server.started))]).model_dump()

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        req = validate(CompletionRequest, parse_json(await read_body(request, max_body)))
        server.check_model(req.model)
        prompts = req.prompts()
        server.check_counts(len(prompts), req.n)
        ids = [server.encode(p) for p in prompts]
        max_tokens = server.check_max_tokens(req.max_tokens)
        echo = [server.engine.tokenizer.decode(p) if req.echo else "" for p in ids for _ in range(req.n)]
        ctx = server.context("cmpl", ids, request)
        job = server.submit(ids, req, max_tokens, req.stop, req.logprobs)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return completion_stream(job, ctx, echo, usage)
        return await completion_reply(job, ctx, echo)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = validate(ChatCompletionRequest, parse_json(await read_body(request, max_body)))
        server.check_model(req.model)
        server.check_counts(1, req.n)
        limit = server.check_max_tokens(
            req.token_limit,
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
        )
        try:
            prompt = server.template.render([{"role": m.role, "content": m.text()} for m in req.messages])
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        ids = [server.encode(prompt, "messages")]
        stop = req.stop + [s for s in server.template.stop if s not in req.stop]
        top = (req.top_logprobs or 0) if req.logprobs else None
        ctx = server.context("chatcmpl", ids, request)
        job = server.submit(ids, req, limit, stop, top)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return chat_stream(job, ctx, usage)
        return await chat_reply(job, ctx)

    return router


def api_key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency that demands `Authorization: Bearer <api_key>` (when a key is set)."""
    expected = None if api_key is None else api_key.encode()

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                kind="authentication_error",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "incorrect API key", kind="authentication_error", code="invalid_api_key")

    return check


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-style error object, including unknown routes and our own bugs."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {
            404: f"unknown route {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return APIError(500, "internal server error", kind="server_error").response()
