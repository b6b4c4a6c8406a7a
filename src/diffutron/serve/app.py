"""The HTTP API (FastAPI): OpenAI-compatible completions and chat, infilling, fill-mask, likelihood
scoring, and the web page at `/`.

Every model call goes through the engine's thread (engine.py): the request handlers only parse,
check and format. Errors are OpenAI's error object: 400 for a bad request (malformed JSON, a bad
setting, a prompt that does not fit), 401 for a missing or wrong key, 404 for an unknown model or
path, 413 for a body over the limit, 429 when the queue is full, 500 when the model fails, 503 when
the server is shutting down or its engine stopped (then `/health` is a 503 too). Two answers come from
below the app, as plain text: uvicorn's 400 for a request it cannot parse (a bad Content-Length, ...),
and the 400 "Invalid host header" of a Host outside the allowed names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import secrets
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from diffutron.errors import DiffutronError, UsageError
from diffutron.precision import name_of
from diffutron.serve import schemas
from diffutron.serve.engine import Engine, EngineError, Finished, Job, Prepared, QueueFull, Unavailable
from diffutron.serve.responses import DONE, CompletionFormatter, Formatter, InfillFormatter, error_body, sse

log = logging.getLogger("diffutron.serve")

MAX_BODY_BYTES = 1 << 20  # a request body over 1 MiB is refused before it is read (413)
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there
# Host names that reach a loopback server only from this machine: a web page elsewhere cannot make a
# browser send them (DNS rebinding sends the attacker's own name), so they are always allowed.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


def create_app(
    lm,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    allowed_hosts: Sequence[str] | None = None,
    model_name: str | None = None,
) -> FastAPI:
    """The app serving `lm`; its engine thread starts and stops with the app (lifespan). `allowed_hosts`:
    the Host names it answers (`trusted_hosts` gives them for an address; None: any). `model_name`: the
    id it serves the model under [default: `served_name(lm.name)`]."""
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue)
    model_id = model_name or served_name(lm.name)
    dtype = name_of(lm.dtype)  # the precision it runs in (/health): fp32, bf16
    created = int(time.time())
    max_text_chars = lm.context_length * schemas.longest_token_chars(lm.tokenizer)

    def check_fits(texts: list[str], param: str) -> None:
        schemas.check_fits(texts, max_text_chars, lm.context_length, param)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    # no /docs: Swagger UI loads its scripts from a CDN, and the server must work offline (/openapi.json stays)
    app = FastAPI(title="diffutron", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    if allowed_hosts is not None:  # added last: the outermost check, before any body is read
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    _error_handlers(app)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())

    def authorize(request: Request) -> None:
        if not authorized(request):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                "authentication_error",
                code="invalid_api_key",
            )

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise ApiError(
                404,
                f"the model {name!r} does not exist: this server serves {model_id!r}",
                "invalid_request_error",
                code="model_not_found",
                param="model",
            )

    v1 = [Depends(authorize)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("diffutron.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Up or down for anyone; the model and the engine's counters only with the key (when one is set).
        Not "ok" ("stopping" / "failed") is a 503, so that a supervisor or balancer moves on."""
        state = engine.state
        body = (
            {"status": state, "model": model_id, "dtype": dtype, **engine.status()}
            if authorized(request)
            else {"status": state}
        )
        return JSONResponse(body, status_code=200 if state == "ok" else 503)

    def model_card() -> dict:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "diffutron",
            "context_length": lm.context_length,
        }

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=v1)
    async def model(name: str) -> dict:
        check_model(name)
        return model_card()

    # -- generation --------------------------------------------------------------------------
    async def run_generation(body: schemas.Generation, request: Request, prompts: list[str], chat: bool):
        """Completions and chat: the prompt texts are tokenised on the engine thread."""
        check_model(body.model)
        body.refuse_unsupported()
        config = body.generation_config()
        max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens) or schemas.DEFAULT_MAX_TOKENS
        if len(prompts) * body.n > engine.max_batch:  # checked before any list of rows is built
            raise schemas.BadRequest(
                f"the request asks for {len(prompts) * body.n} rows (prompts x n), more than --max-batch "
                f"{engine.max_batch}",
                "n",
            )
        schemas.check_steps(config.steps, max_tokens, "max_tokens")
        if not config.truncate_prompt:  # a prompt to truncate may be long: its end is kept
            check_fits(prompts, "messages" if chat else "prompt")

        def prepare() -> Prepared:
            from diffutron.sampling import generation_canvas

            rows = [p for p in prompts for _ in range(body.n)]
            canvas = generation_canvas(lm, rows, max_tokens, truncate_prompt=config.truncate_prompt, frame=config.frame)
            prefix = len(lm.special_affixes[0])
            prompt_tokens = sum(int(s) - prefix for s in canvas.gen_start[:: body.n])
            return Prepared(canvas, config, prompt_tokens)

        job = Job("generate", prepare, stream=body.stream, canvas_events=body.stream_canvas)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        formatter = CompletionFormatter(model_id, job.id, chat=chat, include_usage=include_usage)
        return await answer(job, formatter, request, "chat" if chat else "completion")

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: schemas.CompletionRequest, request: Request):
        return await run_generation(body, request, body.prompts(), chat=False)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: schemas.ChatRequest, request: Request):
        from diffutron.chat import render_prompt

        # rendered here, not on the engine thread: its length is checked before any tokenising (a chat
        # template only formats text; the plain one keeps the user turns only)
        prompt = render_prompt(lm.tokenizer, body.rendered_messages())
        return await run_generation(body, request, [prompt], chat=True)

    @app.post("/v1/infill", dependencies=v1)
    async def infill(body: schemas.InfillRequest, request: Request):
        from diffutron.mask_syntax import blanks

        check_model(body.model)
        texts = body.texts()
        config = body.sampling_config("infill")
        check_fits(texts, "text")
        # a span of unknown length is a row per length: counted before any tokenising
        variable = [[b for b in blanks(t) if b.variable] for t in texts]
        unknown = any(variable)
        if unknown:
            body.check_unknown_lengths(sum(len(v[0].lengths) if v else 1 for v in variable), engine.max_batch)

        def prepare() -> Prepared:
            from diffutron.sampling import infill_canvas
            from diffutron.sampling.canvas import infill_steps

            canvas = infill_canvas(lm, texts)
            # as `sampling.infill`: the masks of a row are one block, one token per step for the longest row
            masks = int(canvas.fillable.sum(dim=1).max())
            schemas.check_steps(config.steps, masks, "the masks of the text")
            steps = infill_steps(canvas, config.steps)
            owners = [t for t, _ in canvas.spans] if canvas.spans is not None else list(range(len(texts)))
            firsts = [owners.index(t) for t in range(len(texts))]  # given tokens counted once per text
            given = int((canvas.attention_mask.bool() & ~canvas.fillable)[firsts].sum()) - len(texts) * sum(
                len(a) for a in lm.special_affixes
            )
            return Prepared(canvas, dataclasses.replace(config, steps=steps, block_length=None), given)

        job = Job("infill", prepare, stream=body.stream, canvas_events=body.stream)
        if not unknown:
            return await answer(job, InfillFormatter(model_id, job.id), request, "infill")
        return await infill_unknown_lengths(job, request)

    async def infill_unknown_lengths(job: Job, request: Request):
        """Every length of each text's unknown-length span filled (a row each), then the best kept: the
        rows' scores are one more call on the engine thread."""
        from diffutron.word_fill import best_lengths

        await engine.submit(job)
        finished = await unless_disconnected(engine.result(job), request, f"{job.id} infill")
        if finished is not None:
            log_request(job, "infill", finished)
            results, spans = finished.results, job.prepared.canvas.spans
            rows, texts = [r.token_ids for r in results], [r.text for r in results]
            work = engine.call(lambda: best_lengths(lm, spans, rows, texts))
            chosen = await unless_disconnected(work, request, f"{job.id} infill scores")
        if finished is None or chosen is None:  # the client went away: its rows or call were dropped
            return JSONResponse(error_body("client disconnected"), status_code=499)
        response = InfillFormatter(model_id, job.id).response(finished)
        response["choices"] = [
            {"index": t, "text": results[c.row].text} | ({"lengths": c.lengths} if c.lengths is not None else {})
            for t, c in enumerate(chosen)
        ]
        return response

    async def answer(job: Job, formatter: Formatter, request: Request, kind: str):
        await engine.submit(job)
        if job.stream:
            return StreamingResponse(
                stream(job, formatter, kind),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        finished = await unless_disconnected(engine.result(job), request, f"{job.id} {kind}")
        if finished is None:  # the client went away: its rows were released
            return JSONResponse(error_body("client disconnected"), status_code=499)
        log_request(job, kind, finished)
        return formatter.response(finished)

    async def unless_disconnected(work, request: Request, what: str):
        """The result of the coroutine `work`, or None when the client goes away first (`work` is then
        cancelled: the engine drops the request's rows or call)."""
        result = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_S)
                if done:
                    return result.result()
                if await request.is_disconnected():
                    log.info("%s: client disconnected", what)
                    return None
        finally:
            result.cancel()

    async def stream(job: Job, formatter: Formatter, kind: str):
        finished = None
        try:
            async for item in engine.events(job):
                for event in formatter.events(item):
                    yield event
                if isinstance(item, Finished):
                    finished = item
            yield DONE
            log_request(job, kind, finished)
        except DiffutronError as error:  # the model failed on this batch, or the server is stopping
            yield sse(error_body(str(error), "server_error"))
            yield DONE
        finally:
            if finished is None:  # the client went away mid-stream: free its rows at the next step
                engine.cancel(job)
                log.info("%s %s: stream closed before the end", job.id, kind)

    # -- one-forward calls ---------------------------------------------------------------------
    @app.post("/v1/fill-mask", dependencies=v1)
    async def fill_mask(body: schemas.FillMaskRequest) -> dict:
        from diffutron.fill_mask import DEFAULT_TOP_K
        from diffutron.fill_mask import fill_mask as top_candidates
        from diffutron.mask_syntax import blanks, count_masks
        from diffutron.word_fill import DEFAULT_BEAM, WordCandidates, word_limit

        check_model(body.model)
        check_fits([body.text], "text")
        top_k, beam = body.top_k or DEFAULT_TOP_K, body.beam or DEFAULT_BEAM
        asked = count_masks(lm, body.text)
        body.check_candidates(asked, top_k)
        words = sum(b.word for b in blanks(body.text))
        if body.max_tokens is not None:
            body.check_words(words, body.max_tokens, beam)  # before the queue, when the length is given
        sequences = body.sequences if body.sequences is not None else asked == 1

        def fill():
            limit = word_limit(lm, body.max_tokens) if words else None  # the default: the corpus's words, read once
            body.check_words(words, limit or 0, beam)
            return top_candidates(lm, body.text, top_k, sequences=sequences, max_tokens=limit, beam=beam)

        started = time.perf_counter()
        found = await engine.call(fill)
        log.info("fill-mask blanks=%d seconds=%.3f", len(found), time.perf_counter() - started)
        masks = [m for m in found if not isinstance(m, WordCandidates)]
        answer = {
            "object": "diffutron.fill_mask",
            "model": model_id,
            "masks": [{"index": i, "candidates": [c.to_dict() for c in m]} for i, m in enumerate(masks)],
        }
        if words:
            found_words = [w for w in found if isinstance(w, WordCandidates)]
            answer["words"] = [{"index": i, "candidates": [c.to_dict() for c in w]} for i, w in enumerate(found_words)]
        return answer

    @app.post("/v1/score", dependencies=v1)
    async def score(body: schemas.ScoreRequest, request: Request):
        from diffutron.serve.scoring import score_slices, work_budget

        check_model(body.model)
        texts, budget = body.texts(), work_budget(lm)
        work = engine.call(lambda: score_slices(lm, texts, body.options(), budget))
        result = await unless_disconnected(work, request, "score")
        if result is None:  # the client went away: the engine dropped the call
            return JSONResponse(error_body("client disconnected"), status_code=499)
        log.info("score texts=%d tokens=%d seconds=%.2f", len(texts), result.tokens, result.seconds)
        return {"object": "diffutron.score", "model": model_id, **result.to_dict()}

    return app


def served_name(name: str) -> str:
    """The id a model is served under: its name (shipped, hub id, preset), or for a local folder the
    folder's own name (a run's `final/`, a checkpoint's `model/`: the folder above), never a local path."""
    from diffutron.model import is_local

    if not name or not is_local(name):
        return name or "diffutron"
    parts = Path(name).expanduser().resolve().parts
    return next((part for part in reversed(parts) if part not in ("final", "model", "/")), "diffutron")


def trusted_hosts(address: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The Host names a server listening on `address` answers (None: any). On a loopback address only
    the loopback names and `extra` (a page elsewhere could otherwise reach it through a name that its
    DNS rebinds to 127.0.0.1); elsewhere any, unless `extra` names some. `*` in `extra`: any; `*.NAME`: NAME's
    subdomains. A name has no port (any port is accepted)."""
    for name in extra:
        if "*" in name[1:] or (name.startswith("*") and name != "*" and not name.startswith("*.")):
            raise UsageError(f"allowed host {name!r}: a wildcard is only '*' or '*.example.com' (a leading '*.')")
        if ":" in name.removeprefix("[").split("]")[-1] or not name.strip() or "/" in name:
            raise UsageError(
                f"allowed host {name!r}: give a host name or address without a port or scheme (IPv6 in brackets)"
            )
    if "*" in extra:
        return None
    try:
        loopback = ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        loopback = address == "localhost"
    if not loopback and not extra:
        return None
    return [*LOOPBACK_NAMES, *extra]


def log_request(job: Job, kind: str, finished: Finished | None) -> None:
    """The one line per request: id, tokens, steps, seconds."""
    if finished is None:
        return
    reasons = ",".join(r.finished_by for r in finished.results)
    log.info(
        "%s %s rows=%d prompt_tokens=%d completion_tokens=%d steps=%d forward_passes=%d seconds=%.2f "
        "queued=%.2f finished_by=%s",
        job.id, kind, len(finished.results), finished.prompt_tokens, finished.completion_tokens, finished.steps,
        finished.forward_passes, finished.seconds, finished.queued_seconds, reasons,
    )  # fmt: skip


def _error_handlers(app: FastAPI) -> None:
    def reply(request: Request, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        log.info("%s %s -> %d %s", request.method, request.url.path, status, body["error"]["message"])
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type")
        if request.method == "POST" and not is_json(content_type):  # FastAPI then passes the raw bytes on
            got = f"Content-Type: {content_type}" if content_type else "no Content-Type"
            message = f"the body is read as JSON only with 'Content-Type: application/json' (this request has {got})"
            return reply(request, 400, error_body(message))
        message, param = validation_message(error.errors())
        return reply(request, 400, error_body(message, param=param))

    @app.exception_handler(UsageError)
    async def bad_request(request: Request, error: UsageError) -> JSONResponse:
        return reply(request, 400, error_body(str(error), param=getattr(error, "param", None)))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        return reply(request, 429, error_body(str(error), "rate_limit_error", code="queue_full"), {"Retry-After": "1"})

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError) -> JSONResponse:
        return reply(request, 500, error_body(str(error), "server_error"))

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, error: Unavailable) -> JSONResponse:
        return reply(request, 503, error_body(str(error), "server_error", code="unavailable"))

    @app.exception_handler(DiffutronError)
    async def failure(request: Request, error: DiffutronError) -> JSONResponse:
        return reply(request, 500, error_body(str(error), "server_error"))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return reply(request, error.status, error_body(str(error), error.kind, error.param, error.code))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return reply(request, error.status_code, error_body(str(error.detail), kind), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return reply(request, 500, error_body(f"internal error: {type(error).__name__}", "server_error"))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_message(errors) -> tuple[str, str | None]:
    """One line for pydantic's errors: the first field that is wrong, and what it should be."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "lone_surrogate":
        return first["msg"], first["ctx"]["field"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(where)!r}", ".".join(where)
    # a union (`str | list[str]`) reports one error per member, the member's type last in `loc`
    members = [e for e in errors if tuple(e.get("loc", ()))[:-1] == tuple(first.get("loc", ()))[:-1]]
    if len(members) > 1 and all(str(e["loc"][-1]).split("[")[0] in _TYPE_TAGS for e in members):
        where = where[:-1]
        expected = " or ".join(str(e["loc"][-1]) for e in members)
        return f"{'.'.join(where)}: expected {expected}", ".".join(where) or None
    return f"{'.'.join(where) or 'body'}: {first['msg']}", ".".join(where) or None


def is_json(content_type: str | None) -> bool:
    """As FastAPI reads a body as JSON: application/json or application/*+json."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413) before they reach a handler, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the request body is over {self.limit:,} bytes")
            return message

        return await self.app(scope, counted, send)


async def _too_large(send, limit: int) -> None:
    response = JSONResponse(error_body(f"the request body is over {limit:,} bytes"), status_code=413)
    await response({"type": "http"}, None, send)
