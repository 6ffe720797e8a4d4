"""OpenAI-style errors, and reading a request body that may be too large, not UTF-8 or not JSON.

Every refusal is an `APIError`, rendered as `{"error": {"message", "type", "param", "code"}}` with a 4xx
(the client's fault) or 5xx (ours) status, which the `openai` client turns into its typed exceptions.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from nanoternary.serve.schemas import ErrorDetail, ErrorResponse

M = TypeVar("M", bound=BaseModel)

DRAIN_FACTOR = 8  # an oversized body is read (and dropped) up to this many times the limit, then cut off


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.kind, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.detail()).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, or 413 when it is larger than `max_bytes` (by Content-Length or by counting).

    A moderately oversized body is still read to its end (and dropped), so that the client, which is
    busy sending it, receives the 413 instead of a reset connection.
    """
    too_large = APIError(
        413,
        f"request body is larger than the limit of {max_bytes} bytes",
        code="body_too_large",
        headers={"Connection": "close"},  # the rest of the body is not read: this connection cannot go on
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * max_bytes:
        raise too_large
    body, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen <= max_bytes:
            body += chunk
        elif seen > DRAIN_FACTOR * max_bytes:
            break
    if seen > max_bytes:
        raise too_large
    return bytes(body)


def _check_strings(value: Any) -> None:
    """Reject JSON strings with unpaired surrogates ("\\ud800"): they cannot be encoded as UTF-8."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object from a UTF-8 body, or a 400 that says what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8: bad byte at position {exc.start}") from exc
    try:
        data = json.loads(text)
        _check_strings(data)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise APIError(400, "request body is nested too deeply") from exc
    except UnicodeEncodeError as exc:
        raise APIError(400, "request body contains a string with an unpaired UTF-16 surrogate") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    """`model` from `data`, or a 400 naming the first bad field and what is wrong with it."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = f"'{param}' is a required property"
        elif param:
            message = f"{param}: {message}"
        raise APIError(400, message, param=param) from exc
