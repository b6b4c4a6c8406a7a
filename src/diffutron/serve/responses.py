"""Response bodies and Server-Sent Events: OpenAI's shapes for completions and chat, diffutron's for the rest.

A streamed completion is standard OpenAI chunks whose text is final when sent (settled left to
right), so a plain OpenAI client prints a correct stream; a client that asks for `stream_canvas`
also gets a `diffutron.step` event per step with the whole canvas (what the web page draws).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from diffutron.serve.engine import Finished, RowUpdate

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # diffutron's -> OpenAI's
DONE = "data: [DONE]\n\n"
STEP_EVENT = "diffutron.step"


def sse(data: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(finished: Finished) -> dict:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        "forward_passes": finished.forward_passes,
    }


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Formatter:
    """One request's answer: the whole response, or its stream of events."""

    prefix, object = "req-", "diffutron.result"

    def __init__(self, model: str, job_id: str):
        self.model, self.id, self.created = model, self.prefix + job_id, int(time.time())

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, finished: Finished) -> dict:
        return {**self.head(self.object), "choices": [self.choice(i, r) for i, r in enumerate(finished.results)]}

    def choice(self, index: int, result) -> dict:
        return {"index": index, "text": result.text}

    def step(self, update: RowUpdate) -> str:
        return sse(self.head(STEP_EVENT) | {"index": update.index, "step": update.step, **update.canvas}, STEP_EVENT)

    def events(self, item: list[RowUpdate] | Finished) -> Iterator[str]:
        if isinstance(item, Finished):
            yield sse(self.response(item))
            return
        for update in item:
            if update.canvas is not None:
                yield self.step(update)


class InfillFormatter(Formatter):
    prefix, object = "infill-", "diffutron.infill"

    def response(self, finished: Finished) -> dict:
        return super().response(finished) | {"usage": usage(finished)}


class CompletionFormatter(Formatter):
    """OpenAI's text completions (`chat=False`) or chat completions."""

    def __init__(self, model: str, job_id: str, chat: bool, include_usage: bool = False):
        self.chat, self.include_usage = chat, include_usage
        self.prefix, self.object = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.opened: set[int] = set()  # chat rows whose first chunk (with the role) went out
        super().__init__(model, job_id)

    def response(self, finished: Finished) -> dict:
        return super().response(finished) | {"usage": usage(finished)}

    def choice(self, index: int, result) -> dict:
        reason = FINISH_REASONS[result.finished_by]
        if self.chat:
            message = {"role": "assistant", "content": result.text}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": result.text, "logprobs": None, "finish_reason": reason}

    def events(self, item: list[RowUpdate] | Finished) -> Iterator[str]:
        if isinstance(item, Finished):
            if self.include_usage:
                yield sse(self.head(self.chunk_object) | {"choices": [], "usage": usage(item)})
            return
        for update in item:
            if update.canvas is not None:
                yield self.step(update)
            opening = self.chat and update.index not in self.opened
            if update.delta or update.result is not None or opening:
                reason = FINISH_REASONS[update.result.finished_by] if update.result is not None else None
                yield sse(self.head(self.chunk_object) | {"choices": [self.chunk(update.index, update.delta, reason)]})

    def chunk(self, index: int, text: str, reason: str | None) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        delta = {"content": text}
        if index not in self.opened:
            self.opened.add(index)
            delta = {"role": "assistant", "content": text}
        elif not text and reason is not None:
            delta = {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
