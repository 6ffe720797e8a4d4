"""The chat template: how a list of chat messages becomes the one prompt text the model completes.

It belongs to the model, not to the request path: the server loads it once at start-up and uses it for
every chat request (streaming or not, API or chat page). Where it comes from, first match wins:

1. `chat_template` in the model's meta.json (an export folder, or the `nanoternary.meta` a GGUF carries);
2. `tokenizer.chat_template` in a GGUF file (the key llama.cpp and Hugging Face use);
3. `DEFAULT_TEMPLATE` below.

Templates are Jinja2, rendered in a sandbox with the variables Hugging Face templates expect
(`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`), so a GGUF made
elsewhere works unchanged. `chat_stop` in meta.json (a list of strings) adds stop strings to every chat
request; the default template stops at its next turn header, because a base model that was never
tuned on chats happily writes the user's next turn too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanoternary.data.tokenizer import EOT
from nanoternary.io.gguf import open_reader

GGUF_KEY = "tokenizer.chat_template"

# "### <role>\n<content>\n\n" per message, then "### assistant\n" for the reply.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}### {{ message.role }}\n{{ message.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant\n{% endif %}"
)
DEFAULT_STOP = ("\n### ",)


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template, where it came from (for /health) and the stop strings chats get."""

    source: str
    origin: str
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            self._compiled  # noqa: B018 -- a broken template fails at start-up, not on the first chat
        except TemplateError as exc:
            raise ValueError(f"invalid chat template from {self.origin}: {exc}") from exc

    @cached_property
    def _compiled(self) -> Any:
        return ImmutableSandboxedEnvironment().from_string(self.source)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages` (dicts with role and content), ending where the reply begins."""
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token="",
                eos_token=EOT,
                raise_exception=_raise,
            )
        except TemplateError as exc:
            raise ValueError(f"the chat template rejected the messages: {exc}") from exc


def load_chat_template(model_path: str | Path, meta: dict[str, Any]) -> ChatTemplate:
    """The template stored with the model at `model_path` (export folder or .gguf) whose meta is `meta`."""
    stop = meta.get("chat_stop")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise ValueError(f"chat_stop in the model's meta must be a list of non-empty strings, got {stop!r}")
    if isinstance(meta.get("chat_template"), str):
        return ChatTemplate(meta["chat_template"], "meta.json", tuple(stop or ()))
    path = Path(model_path)
    if path.suffix == ".gguf":
        field = open_reader(path).fields.get(GGUF_KEY)
        if field is not None:
            return ChatTemplate(str(field.contents()), f"gguf:{GGUF_KEY}", tuple(stop or ()))
    return ChatTemplate(DEFAULT_TEMPLATE, "default", tuple(stop) if stop is not None else DEFAULT_STOP)
