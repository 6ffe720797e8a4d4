"""Continuous batching: one background thread advances every active request with one `Engine.step` per tick.

Each tick admits waiting sequences (up to `max_batch` in flight), runs ONE batched forward pass over all of
them (new prompts are prefilled in the same pass in which running ones decode a token), samples each row
with its request's own settings and seeded generator (`Generation.feed`), and posts the new text to the
request's asyncio queue. A request therefore joins and leaves the batch at any token, and throughput
grows with the number of clients instead of serializing them.

The engine is not thread-safe, so only this thread touches it. Requests are handed over under a lock;
results go back with `loop.call_soon_threadsafe`. A request whose client went away is flagged `cancelled`
and dropped at the next tick, freeing its KV cache. More than `max_batch + max_queue` sequences at once
raise `QueueFull` (the server answers 503 with Retry-After). A failure inside a forward pass fails the
requests of that batch with an error event; the loop itself keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from nanoternary.infer.engine import Engine, Generation
from nanoternary.infer.sampling import SamplingParams
from nanoternary.serve.logprobs import TokenScore, score

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The server holds as many sequences as it accepts; the client should retry later."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new requests."""


@dataclass
class Event:
    """News about one choice: new safe text; on the last event finish_reason (or error) is set."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    scores: list[TokenScore] = field(default_factory=list)
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class ChoiceSpec:
    """One sequence to generate: prompt ids, sampling settings, and how many top logprobs (None: none)."""

    prompt_ids: list[int]
    params: SamplingParams
    top_logprobs: int | None = None


class Job:
    """One request: its choices' events arrive, in order, as lists on `queue` (read from the event loop)."""

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop, wants_logprobs: bool = False) -> None:
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.loop, self.size, self.wants_logprobs = loop, size, wants_logprobs
        self.unfinished = size  # choices without a final event yet; counted down by the reader
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating for this request (a no-op once it has finished)."""
        self.cancelled = True

    async def next(self, timeout_s: float | None = None) -> list[Event] | None:
        """The next batch of events (None after `timeout_s` without any); counts finished choices down."""
        try:
            events = await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None
        self.unfinished -= sum(e.final for e in events)
        return events

    def post(self, events: list[Event]) -> None:
        """Called from the scheduler thread."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server is gone, nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)


class Choice:
    """A Generation bound to its request and choice index."""

    def __init__(self, job: Job, index: int, gen: Generation, top_logprobs: int | None) -> None:
        self.job, self.index, self.gen, self.top_logprobs = job, index, gen, top_logprobs

    def advance(self, logits: torch.Tensor) -> Event:
        """Sample the next token from this choice's row of logits; the event says what changed."""
        before = len(self.gen.token_ids)
        text = self.gen.feed(logits)
        new = self.gen.token_ids[before:]  # empty when end-of-text was sampled
        scores = [score(logits, t, self.top_logprobs) for t in new] if self.top_logprobs is not None else []
        return Event(self.index, text, self.gen.finish_reason, len(self.gen.token_ids), scores)


class Scheduler:
    """Owns the engine's thread; `submit` from the event loop, read events from the returned Job."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self._cond = threading.Condition()
        self._pending: deque[Choice] = deque()
        self._active: list[Choice] = []
        self._load = 0  # choices pending or active
        self._stopping = False
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="nanoternary-scheduler", daemon=True)
        self.steps = 0
        self.sampled = 0  # tokens sampled, end-of-text included

    # ---- event-loop side --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, specs: list[ChoiceSpec]) -> Job:
        """Queue one request's choices (call from the running event loop). Raises QueueFull,
        ShuttingDown, or ValueError for a prompt the engine refuses."""
        job = Job(len(specs), asyncio.get_running_loop(), specs[0].top_logprobs is not None)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._load + len(specs) > self.max_batch + self.max_queue:
                raise QueueFull(
                    f"the server is at capacity ({self._load} sequences generating or waiting, "
                    f"limit {self.max_batch + self.max_queue})"
                )
            choices = [
                Choice(job, i, Generation(self.engine, s.prompt_ids, s.params), s.top_logprobs)
                for i, s in enumerate(specs)
            ]
            self._pending.extend(choices)
            self._load += len(choices)
            self._cond.notify()
        return job

    @property
    def load(self) -> tuple[int, int]:
        """(sequences in the batch, sequences waiting)."""
        with self._cond:
            return len(self._active), len(self._pending)

    def stop(self, timeout_s: float) -> None:
        """Refuse new work, let the loop finish what it holds for up to `timeout_s`, then abort the rest."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify()
            self._thread.join()

    # ---- scheduler thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._active or self._stopping):
                    self._cond.wait()
                if self._abort or (self._stopping and not (self._pending or self._active)):
                    break
                self._admit()
            try:
                self._tick()
            except Exception:  # a bug here must not leave every client waiting forever
                log.exception("scheduler tick failed")
                with self._cond:
                    failed, self._active = self._active, []
                    self._load -= len(failed)
                self._finish(failed, "internal error in the scheduler")
        with self._cond:
            leftover = [*self._active, *self._pending]
            self._active, self._pending = [], deque()
        self._finish(leftover, "the server shut down before this request finished")

    def _admit(self) -> None:
        """Drop cancelled waiters and move waiting choices into the batch while there is room (lock held)."""
        gone = [c for c in self._pending if c.job.cancelled]
        if gone:
            self._pending = deque(c for c in self._pending if not c.job.cancelled)
            self._load -= len(gone)
        while self._pending and len(self._active) < self.max_batch:
            self._active.append(self._pending.popleft())

    def _tick(self) -> None:
        outbox: dict[Job, list[Event]] = {}
        running, done = [], []
        for choice in self._active:
            if choice.job.cancelled:
                done.append(choice)
            elif choice.gen.done:  # max_tokens=0: finished before its first step
                outbox.setdefault(choice.job, []).append(Event(choice.index, "", choice.gen.finish_reason))
                done.append(choice)
            else:
                running.append(choice)
        if running:
            done += self._step(running, outbox)
        for job, events in outbox.items():
            job.post(events)
        if done:
            finished = {id(c) for c in done}
            with self._cond:
                self._active = [c for c in self._active if id(c) not in finished]
                self._load -= len(done)

    def _step(self, running: list[Choice], outbox: dict[Job, list[Event]]) -> list[Choice]:
        """One forward pass and one sampled token per choice; returns the choices that finished."""
        try:
            logits = self.engine.step([c.gen.seq for c in running])
        except Exception:  # never let one bad batch take the server down
            log.exception("forward pass failed for a batch of %d sequences", len(running))
            for choice in running:
                outbox.setdefault(choice.job, []).append(
                    Event(choice.index, error="internal error in the model")
                )
            return running
        self.steps += 1
        self.sampled += len(running)
        done = []
        for choice, row in zip(running, logits, strict=True):
            try:
                event = choice.advance(row)
            except Exception as exc:  # e.g. a tokenizer failure: fail this request only
                log.exception("sampling failed")
                event = Event(choice.index, error=f"internal error while sampling: {exc}")
            if event.text or event.final or event.scores:
                outbox.setdefault(choice.job, []).append(event)
            if event.final:
                done.append(choice)
        return done

    def _finish(self, choices: list[Choice], error: str) -> None:
        """Tell the readers of `choices` that they end in `error`."""
        outbox: dict[Job, list[Event]] = {}
        for choice in choices:
            outbox.setdefault(choice.job, []).append(Event(choice.index, error=error))
        for job, events in outbox.items():
            job.post(events)
