"""Step-level continuous batching: requests join the running denoising batch between steps and leave it
when they finish, sharing each forward pass.

One thread owns the model. Between two steps it prepares the new requests (tokenizer, canvas, the
sampler's own checks), drops the rows of clients that went away, runs one slice of at most one other
model call (fill-mask in one slice; scoring a forward pass at a time, so streams keep moving), admits
waiting requests while the batch has room, and runs one step. Rows whose `(mode, config.batch_key())`
are equal share a `Denoiser`; groups with different keys take turns step by step, so no group waits for
another to finish. A row's random numbers, blocks and cache refreshes are its own, so its neighbours
change only the encoder's rounding (the padded width sets the order of its sums): a request gets the
same text alone or in company unless one of its decisions is a near tie at that rounding (docs/serve.md,
Batching). Each request hears about its rows through an asyncio queue on its own event loop: the event
loop never waits on torch.

When the thread stops, every request it holds or has not yet taken gets an error: a stop asked for
(`stop`: "the server is shutting down", 503) or a bug in the loop itself (500 for the requests in
flight, 503 for any after; `failure` is set and `on_failure` called, so the process can exit non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field

import torch

from diffutron.errors import DiffutronError, UsageError
from diffutron.sampling import Canvas, Denoiser, RowResult, SamplingConfig

log = logging.getLogger("diffutron.serve")


class QueueFull(DiffutronError):
    """More requests are waiting than --max-queue allows (HTTP 429)."""


class EngineError(DiffutronError):
    """The model failed on a batch, or the engine stopped while the request was in it (HTTP 500)."""


class Unavailable(EngineError):
    """The engine takes no more requests: the server is shutting down, or the engine stopped (HTTP 503)."""


@dataclass
class Prepared:
    """What a request's `prepare` returns, on the engine thread."""

    canvas: Canvas
    config: SamplingConfig
    prompt_tokens: int = 0  # given tokens, counted once per prompt (usage)


@dataclass
class RowUpdate:
    """One row after one step."""

    index: int  # the row's place in its request
    step: int  # the request's steps so far
    delta: str  # text that became final at this step (streaming requests; never the start of a stop string)
    canvas: dict | None  # {"tokens": [str | None (mask)], "state": one letter per token} when asked for
    result: RowResult | None  # set when the row finished at this step


@dataclass
class Finished:
    """All rows of a request are done."""

    results: list[RowResult]
    steps: int  # steps the request took part in
    forward_passes: int  # forward passes it took part in (shared with the rows beside it)
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # from submission to the last step
    queued_seconds: float  # of which waiting for room in the batch


# Canvas states, one letter per shown token: given (prompt / given text), still a mask, revealed at this
# step, revealed earlier, an end-of-sequence (special) token the model wrote.
GIVEN, MASK, NEW, COMMITTED, END = "p", "m", "n", "c", "e"


@dataclass(eq=False)
class Job:
    """One HTTP request's rows. `prepare` runs on the engine thread and may raise UsageError."""

    mode: str  # "generate" or "infill"
    prepare: Callable[[], Prepared]
    stream: bool = False  # send text deltas as rows settle
    canvas_events: bool = False  # send every step's canvas
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    # set by the engine
    rows: int = 0
    prepared: Prepared | None = None
    done: bool = False
    _loop: asyncio.AbstractEventLoop | None = None
    _events: asyncio.Queue | None = None
    _accepted: asyncio.Future | None = None
    _submitted: float = 0.0
    _admitted: float = 0.0
    _group: tuple | None = None
    _texts: list = field(default_factory=list)
    _emitted: list[str] = field(default_factory=list)
    _results: list[RowResult | None] = field(default_factory=list)
    _shown: list[tuple[int, list[bool]]] = field(default_factory=list)  # per row: length, fixed positions
    _steps: int = 0


@dataclass(eq=False)
class Call:
    """A model call between two steps: fn() returns its value, or a generator run one slice per loop
    (each next() one slice; its return value is the call's)."""

    fn: Callable[[], object]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    slices: Generator | None = None
    cancelled: bool = False  # the caller went away: dropped at the next slice

    def close(self) -> None:
        """A sliced call left unfinished cleans up now, not at interpreter exit."""
        if self.slices is not None:
            with contextlib.suppress(Exception):
                self.slices.close()


class Engine:
    """The batching loop in its own thread. `submit`, `events`, `cancel` and `call` are for the event loop."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise UsageError("max_batch and max_queue must be at least 1")
        self.lm, self.max_batch, self.max_queue = lm, max_batch, max_queue
        self._lock = threading.Condition()
        # shared with the event loop, under _lock
        self._inbox: list[Job] = []
        self._calls: deque = deque()
        self._cancelled: set[str] = set()
        self._queued = 0  # jobs and calls submitted but not yet running
        self._closed = False  # the thread is to stop (it fails what it holds)
        self._refusal: str | None = None  # why new requests are refused (503), once they are
        self._asleep = False  # the thread waits with nothing to do
        self.failure: BaseException | None = None  # what stopped the thread, when a bug did
        self.on_failure: Callable[[], None] | None = None  # called from the thread after a failure
        # the engine thread's own (read by _close once the thread has stopped)
        self._incoming: list[Job] = []  # taken from the inbox, being prepared
        self._task: Call | None = None  # the call running slice by slice
        self._waiting: deque[Job] = deque()
        self._groups: dict[tuple, Denoiser] = {}
        self._jobs: dict[str, Job] = {}
        self._rows = 0
        self._turn = 0
        self._pieces: dict[int, str] = {}
        self.stats = {
            "requests": 0,
            "steps": 0,
            "forward_passes": 0,
            "rows_stepped": 0,
            "cancelled_rows": 0,
            "calls": 0,
            "call_slices": 0,
            "cancelled_calls": 0,
        }
        self._thread = threading.Thread(target=self._run, name="diffutron-engine", daemon=True)

    # -- the event loop's side -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def refuse(self, reason: str = "the server is shutting down") -> None:
        """Take no more requests (503 `reason`). The rows already here go on; calls not yet answered get the
        503 at the next slice (a score may need minutes, a completion usually a few seconds)."""
        with self._lock:
            self._refusal = self._refusal or reason
            self._lock.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail every one still here at the end of the current step or slice, and wait
        up to `timeout` seconds for the thread."""
        self.refuse()
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        """Nothing in flight: no request or call submitted and unanswered (or the thread has stopped)."""
        with self._lock:
            stopped = self._thread.ident is not None and not self._thread.is_alive()
            return stopped or (self._asleep and not (self._inbox or self._calls or self._cancelled))

    @property
    def state(self) -> str:
        """`ok`, `stopping` (refusing new requests) or `failed` (the thread stopped on a bug)."""
        return "failed" if self.failure is not None else "stopping" if self._refusal else "ok"

    def status(self) -> dict:
        return {
            **self.stats,
            "active_rows": self._rows,
            "active_requests": len(self._jobs),
            "active_calls": int(self._task is not None),
            "queued": self._queued,
            "groups": len(self._groups),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
        }

    def _enqueue(self) -> None:
        """Count one more waiting request, or refuse it (call under _lock)."""
        if self._refusal or self._closed:
            raise Unavailable(self._refusal or "the server is shutting down")
        if self._queued >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self._queued += 1

    async def submit(self, job: Job) -> None:
        """Queue `job` and return once it is prepared; raises QueueFull, or UsageError for a bad request."""
        loop = asyncio.get_running_loop()
        job._loop, job._events, job._accepted = loop, asyncio.Queue(), loop.create_future()
        job._submitted = time.perf_counter()
        with self._lock:
            self._enqueue()
            self._inbox.append(job)
            self._lock.notify()
        try:
            await job._accepted
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    async def events(self, job: Job) -> AsyncIterator[list[RowUpdate] | Finished]:
        """The job's updates (lists of RowUpdate, streaming jobs only), then its Finished."""
        while True:
            item = await job._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    async def result(self, job: Job) -> Finished:
        """The job's Finished; cancelling the wait releases the job's rows."""
        try:
            async for item in self.events(job):
                if isinstance(item, Finished):
                    return item
        except asyncio.CancelledError:
            self.cancel(job)
            raise
        raise EngineError("the request ended without a result")  # pragma: no cover

    def cancel(self, job: Job) -> None:
        """Release the job's rows at the next step (a client went away); nothing if it is done."""
        if job.done:
            return
        with self._lock:
            self._cancelled.add(job.id)
            self._lock.notify()

    async def call(self, fn: Callable[[], object]):
        """Run fn() on the engine thread between two steps (one model call at a time). When fn() returns a
        generator, each next() is one slice, run between two steps, and the generator's return value is
        the result. Cancelling the wait drops the call at its next slice."""
        loop = asyncio.get_running_loop()
        call = Call(fn, loop.create_future(), loop)
        with self._lock:
            self._enqueue()
            self._calls.append(call)
            self._lock.notify()
        try:
            return await call.future
        except asyncio.CancelledError:
            with self._lock:
                call.cancelled = True
                self._lock.notify()
            raise

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._work()
            error = Unavailable("the server is shutting down")
        except BaseException as failure:  # a bug in the loop: every request here and after gets an error
            log.exception("the engine stopped")
            self.failure = failure
            self.refuse(f"the engine stopped on an internal error ({type(failure).__name__}); the server is stopping")
            error = EngineError(f"the engine stopped: {type(failure).__name__}: {failure}")
        with self._lock:
            self._closed = True
        self._close(error)
        if self.failure is not None and self.on_failure is not None:
            self.on_failure()

    def _work(self) -> None:
        while True:
            with self._lock:
                # jobs waiting for room count as work: once the batch empties, nothing else would admit them
                while not (
                    self._inbox
                    or self._calls
                    or self._cancelled
                    or self._groups
                    or self._waiting
                    or self._task
                    or self._closed
                ):
                    self._asleep = True
                    self._lock.wait()
                self._asleep = False
                if self._closed:
                    break
                self._incoming, self._inbox = self._incoming + self._inbox, []
                cancelled, self._cancelled = self._cancelled, set()
                while self._task is None and self._calls:  # the next call not given up by its caller
                    self._task = self._calls.popleft()
                    self._queued -= 1
                    if self._task.cancelled:
                        self._task = None
                        self.stats["cancelled_calls"] += 1
            while self._incoming:
                self._prepare(self._incoming[0])
                self._incoming.pop(0)
            self._cancel(cancelled)
            if self._refusal and self._task is not None:
                self._drop_calls()
            if self._task is not None:
                self._slice()
            self._admit()
            if self._groups:
                self._step()

    def _prepare(self, job: Job) -> None:
        try:
            prepared = job.prepare()
            rows = prepared.canvas.ids.shape[0]
            if rows > self.max_batch:
                raise UsageError(
                    f"the request asks for {rows} rows (prompts x n), more than --max-batch {self.max_batch}"
                )
            # the sampler's own checks of lengths, blocks and steps, before the client gets an answer
            Denoiser(self.lm, prepared.config, job.mode).add(prepared.canvas, prepared.config)
        except Exception as error:  # noqa: BLE001 -- UsageError for the client; anything else is logged as a bug
            if not isinstance(error, DiffutronError):
                log.exception("preparing request %s failed", job.id)
                error = EngineError(f"preparing the request failed: {type(error).__name__}: {error}")
            with self._lock:
                self._queued -= 1
            job.done = True
            _deliver(job._loop, _resolve, job._accepted, error)
            return
        job.prepared, job.rows = prepared, rows
        self._waiting.append(job)
        _deliver(job._loop, _resolve, job._accepted, None)

    def _cancel(self, ids: set[str]) -> None:
        for job in [j for j in self._waiting if j.id in ids]:
            self._waiting.remove(job)
            job.done = True
            with self._lock:
                self._queued -= 1
        for job_id in ids & self._jobs.keys():
            job = self._jobs.pop(job_id)
            keys = [(job.id, i) for i, r in enumerate(job._results) if r is None]
            denoiser = self._groups[job._group]
            denoiser.cancel(keys)
            self._rows -= len(keys)
            self.stats["cancelled_rows"] += len(keys)
            job.done = True
            if not len(denoiser):
                del self._groups[job._group]
            log.info("%s cancelled: %d rows released", job.id, len(keys))

    def _slice(self) -> None:
        """One slice of the running call: all of a plain call, one next() of a sliced one."""
        call = self._task
        if call.cancelled:
            call.close()
            self._task = None
            self.stats["cancelled_calls"] += 1
            log.info("a call was cancelled: its caller went away")
            return
        self.stats["call_slices"] += 1
        try:
            if call.slices is None:
                value = call.fn()
                if not inspect.isgenerator(value):
                    return self._answer(call, value)
                call.slices = value
            next(call.slices)
        except StopIteration as end:
            self._answer(call, end.value)
        except Exception as error:  # noqa: BLE001 -- handed to the caller
            if not isinstance(error, DiffutronError):
                log.exception("a model call failed")
            self._answer(call, error)

    def _drop_calls(self) -> None:
        """Refusing: the running call and those waiting get the 503."""
        with self._lock:
            calls = [self._task, *self._calls]
            self._queued -= len(self._calls)
            self._calls.clear()
        self._task.close()
        error = Unavailable(self._refusal)
        for call in calls:
            self._answer(call, error)

    def _answer(self, call: Call, value) -> None:
        self._task = None
        self.stats["calls"] += 1
        _deliver(call.loop, _resolve, call.future, value)

    def _admit(self) -> None:
        """Waiting jobs join the batch, oldest first, while it has room."""
        while self._waiting and self._rows + self._waiting[0].rows <= self.max_batch:
            job = self._waiting.popleft()
            with self._lock:
                self._queued -= 1
            canvas, config = job.prepared.canvas, job.prepared.config
            key = (job.mode, config.batch_key())  # cached rows too: each refreshes on its own rhythm
            denoiser = self._groups.get(key) or Denoiser(self.lm, config, job.mode)
            try:
                denoiser.add(canvas, config, keys=[(job.id, i) for i in range(job.rows)], track_text=job.stream)
            except Exception as error:  # noqa: BLE001 -- checked in _prepare: a bug, but only this request's
                log.exception("adding request %s failed", job.id)
                self._fail(job, EngineError(f"the request could not join the batch: {error}"))
                continue
            self._groups[key] = denoiser
            job._group, job._admitted = key, time.perf_counter()
            job._texts = denoiser.texts[-job.rows :]
            job._emitted = [""] * job.rows
            job._results = [None] * job.rows
            lengths = canvas.attention_mask.sum(dim=1).tolist()
            job._shown = [(n, (~canvas.fillable[i, :n]).tolist()) for i, n in enumerate(lengths)]
            self._jobs[job.id] = job
            self._rows += job.rows
            self.stats["requests"] += 1

    def _step(self) -> None:
        """One step of the next group in turn."""
        keys = list(self._groups)
        key = keys[self._turn % len(keys)]
        self._turn += 1
        denoiser = self._groups[key]
        try:
            batch = denoiser.step()
        except Exception as error:  # noqa: BLE001 -- fail this group's requests, keep serving the others
            log.exception("a denoising step failed")
            del self._groups[key]
            for job in [j for j in self._jobs.values() if j._group == key]:
                self._fail(job, EngineError(f"the model failed: {type(error).__name__}: {error}"))
            return
        passes = 2 if denoiser.config.cfg_scale > 0 else 1
        self.stats["steps"] += 1
        self.stats["forward_passes"] += passes
        self.stats["rows_stepped"] += len(batch.keys)
        self._dispatch(batch, passes)
        if not len(denoiser):
            del self._groups[key]

    def _dispatch(self, batch, passes: int) -> None:
        """Hand each job the updates of its rows, and its result when its last row is done."""
        ids, revealed = batch.ids.cpu(), batch.revealed.cpu()
        updates: dict[str, list[RowUpdate]] = {}
        for r, ((job_id, i), result) in enumerate(zip(batch.keys, batch.finished, strict=True)):
            job = self._jobs[job_id]
            if job_id not in updates:
                job._steps += 1
            rows = updates.setdefault(job_id, [])
            if result is not None:
                job._results[i] = result
                self._rows -= 1
            if job.stream or job.canvas_events:
                delta = self._delta(job, i, result)
                shown = self._canvas(job, i, ids[r], revealed[r]) if job.canvas_events else None
                rows.append(RowUpdate(i, job._steps, delta, shown, result))
        for job_id, rows in updates.items():
            job = self._jobs[job_id]
            items: list = [rows] if rows else []
            if all(r is not None for r in job._results):
                del self._jobs[job_id]
                job.done = True
                items.append(self._finished(job, passes))
            if items:
                _deliver(job._loop, _put_all, job._events, items)

    def _delta(self, job: Job, i: int, result: RowResult | None) -> str:
        """The row's text that became final: the settled text less any tail that may start a stop string;
        at the end, the rest of the final text."""
        if job.mode != "generate":
            return ""
        emitted = job._emitted[i]
        if result is not None:
            final = result.text
            shown = final if final.startswith(emitted) else emitted  # never unsay what was sent
        else:
            tracked = job._texts[i]
            shown = tracked.text[: len(tracked.text) - _stop_prefix(tracked.text, tracked.stops)]
        job._emitted[i] = max(shown, emitted, key=len)
        return job._emitted[i][len(emitted) :]

    def _canvas(self, job: Job, i: int, ids: torch.Tensor, revealed: torch.Tensor) -> dict:
        length, fixed = job._shown[i]
        mask_id, specials = self.lm.mask_id, self.lm.special_ids
        tokens, state = [], []
        for token, new, given in zip(ids[:length].tolist(), revealed[:length].tolist(), fixed, strict=True):
            if given:
                if token in specials:  # the frame: [CLS], [SEP]
                    continue
                tokens.append(self._piece(token))
                state.append(GIVEN)
            elif token == mask_id:
                tokens.append(None)
                state.append(MASK)
            else:
                tokens.append(self._piece(token))
                state.append(END if token in specials else NEW if new else COMMITTED)
        return {"tokens": tokens, "state": "".join(state)}

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.lm.tokenizer.decode([token], skip_special_tokens=False)
        return piece

    def _finished(self, job: Job, passes: int) -> Finished:
        results = job._results
        if job.mode == "generate":
            completion = sum(len(r.token_ids) for r in results)
        else:  # infill: the masks filled
            completion = int(job.prepared.canvas.fillable.sum())
        steps = max(r.steps for r in results)
        return Finished(
            results=results,
            steps=steps,
            forward_passes=steps * passes,
            prompt_tokens=job.prepared.prompt_tokens,
            completion_tokens=completion,
            seconds=time.perf_counter() - job._submitted,
            queued_seconds=job._admitted - job._submitted,
        )

    def _fail(self, job: Job, error: Exception) -> None:
        self._jobs.pop(job.id, None)
        self._rows -= sum(r is None for r in job._results)
        job.done = True
        _deliver(job._loop, _put_all, job._events, [error])

    def _close(self, error: EngineError) -> None:
        """The thread has stopped: every request and call it holds or has not yet taken gets `error` (those
        not yet taken, a 503). Nothing here may fail, or a client would wait for good."""
        unavailable = Unavailable(self._refusal or "the server is shutting down")
        with self._lock:
            inbox, self._inbox = self._inbox, []
            calls = list(self._calls)
            self._calls.clear()
        running = [*self._jobs.values(), *self._waiting, *self._incoming]
        for job in running + inbox:
            reply = error if job in running else unavailable
            job.done = True
            _deliver(job._loop, _resolve, job._accepted, reply)
            _deliver(job._loop, _put_all, job._events, [reply])
        if self._task is not None:
            _deliver(self._task.loop, _resolve, self._task.future, error)
            self._task.close()
        for call in calls:
            _deliver(call.loop, _resolve, call.future, unavailable)
        self._jobs.clear()
        self._groups.clear()
        self._waiting.clear()
        self._incoming, self._task, self._rows = [], None, 0


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (held back: it may become one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _deliver(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


def _resolve(future: asyncio.Future, value) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def _put_all(queue: asyncio.Queue, items: list) -> None:
    for item in items:
        queue.put_nowait(item)
