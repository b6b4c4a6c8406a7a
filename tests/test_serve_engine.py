"""The serving engine under faults and load: a request waiting for room once the batch empties, clients
that go away (a completion, a score), a score as large as allowed beside a stream, a fault injected at
each point of the engine loop, and the process stopping (SIGTERM with requests in flight, idle, an engine
failure).

Servers run on 127.0.0.1 (a free port): in-process, or as a real `diffutron serve` process where the
process's exit is the point. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
from test_serve import PROMPT, events_of, lm  # noqa: F401 -- lm is a fixture

from diffutron.serve import create_app, serving
from diffutron.serve.engine import Engine

LONG_STREAM = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "stream_canvas": True}  # an event per step
# The largest score request tiny-diffutron's work budget allows of this shape: 10,000 windows of 3 tokens,
# 1 + 19 passes over them (one more ELBO stratum is refused, see test_a_score_over_the_work_budget_is_refused)
MAX_SCORE = {"text": ["a"] * 10_000, "samples": 1, "elbo_samples": 19}
LONG_SCORE = {"text": ["a b"] * 40, "elbo_samples": 64}  # 65 slices, each light


def health_until(client: httpx.Client, done, seconds: float = 30.0) -> dict:
    """Poll /health until done(health) or `seconds` pass; the last health."""
    deadline = time.monotonic() + seconds
    while True:
        health = client.get("/health").json()
        if done(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.02)


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST on a bare socket and return it unread: closing it is a client going away mid-request."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, port), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    sock.sendall(head.encode() + b"\r\n" + data)
    return sock


class Background:
    """A request in a thread of its own: `.reply` once it is answered."""

    def __init__(self, url: str, path: str, body: dict, timeout: float = 60):
        self.reply: httpx.Response | None = None
        self.error: Exception | None = None

        def run():
            try:
                with httpx.Client(base_url=url, timeout=timeout) as own:
                    self.reply = own.post(path, json=body)
            except Exception as error:  # noqa: BLE001 -- the test reads it
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, seconds: float) -> httpx.Response:
        self.thread.join(seconds)
        assert not self.thread.is_alive(), "no answer"
        assert self.error is None, self.error
        return self.reply


def rest_of(lines) -> list:
    """The events of a stream's lines not yet read."""
    return events_of(SimpleNamespace(iter_lines=lambda: lines))


def first_data(lines) -> None:
    """Read a stream's lines up to its first data line (the request is running)."""
    while not next(lines).startswith("data:"):
        pass


# -- item 11: a waiting request once the batch empties ---------------------------------------------------
def test_a_request_waiting_for_room_runs_once_the_batch_empties(lm):  # noqa: F811
    """The hostile-client sequence: n=16 fills --max-batch 16, a second request comes 0.3 s later and
    waits for room; when the first finishes the batch is empty and the second must run (it used to wait
    until its client gave up: the engine slept while a request waited)."""
    with serving(create_app(lm, max_batch=16)) as url, httpx.Client(base_url=url, timeout=60) as client:
        first = Background(url, "/v1/completions", {"prompt": "a", "n": 16, "max_tokens": 32})
        time.sleep(0.3)
        second = Background(url, "/v1/completions", {"prompt": "b", "max_tokens": 8})
        queued = health_until(client, lambda h: h["queued"] == 1 or not first.thread.is_alive())
        assert queued["queued"] == 1, "the second request should wait for room"
        assert first.wait(60).status_code == 200
        second.thread.join(20)  # 8 steps of one row
        assert not second.thread.is_alive(), f"the second request hangs: {client.get('/health').json()}"
        assert second.reply.status_code == 200 and len(second.reply.json()["choices"]) == 1
        idle = client.get("/health").json()
        assert idle["queued"] == 0 and idle["active_rows"] == 0


# -- items 21 and 9: clients that go away, a large score beside a stream ---------------------------------
def test_a_client_gone_before_its_answer_releases_its_rows(lm, caplog):  # noqa: F811
    """A non-streaming request whose client disconnects: its rows leave the batch at the next step (the
    499 path) and the server goes on."""
    caplog.set_level("INFO", logger="diffutron.serve")
    with serving(create_app(lm)) as url, httpx.Client(base_url=url, timeout=60) as client:
        sock = raw_post(url, "/v1/completions", {"prompt": PROMPT, "n": 2, "max_tokens": 400})
        running = health_until(client, lambda h: h["active_rows"] == 2)
        assert running["active_rows"] == 2
        sock.close()
        after = health_until(client, lambda h: h["active_rows"] == 0, seconds=20)
        assert after["active_rows"] == 0 and after["active_requests"] == 0
        assert after["cancelled_rows"] == 2 and after["steps"] < 400
        assert "completion: client disconnected" in caplog.text
        assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).status_code == 200


def test_a_score_over_the_work_budget_is_refused(lm):  # noqa: F811
    """Scoring is bounded by forward tokens (scaled to the model), not characters: 10,000 one-letter
    texts at 8 samples / 64 strata (30 KB) held the engine for 741 s; now a 400 before any forward pass."""
    from diffutron.serve.scoring import work_budget

    assert work_budget(lm) == 614_721  # 4e12 / 6.5M parameters
    with serving(create_app(lm)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for body in ({"text": ["a"] * 10_000, "samples": 8, "elbo_samples": 64}, {**MAX_SCORE, "elbo_samples": 20}):
            reply = client.post("/v1/score", json=body)
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert "forward tokens" in error["message"] and "614,721" in error["message"] and error["param"] == "text"
        assert client.get("/health").json()["call_slices"] == 2  # refused in the first slice, before the model ran


def test_streams_keep_moving_while_the_largest_score_runs_and_a_gone_scorer_stops(lm):  # noqa: F811
    """A score as large as the budget allows runs a forward pass per slice, with a denoising step between
    two slices: a stream keeps getting its steps, one slice apart (unsliced, the stream stopped until the
    whole score was done: minutes). When the scoring client goes away, the engine drops the call at its
    next slice."""
    with (
        serving(create_app(lm)) as url,
        httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=30)) as client,
        client.stream("POST", "/v1/completions", json=LONG_STREAM) as stream,
    ):
        lines = stream.iter_lines()
        first_data(lines)
        sock = raw_post(url, "/v1/score", MAX_SCORE)
        before = health_until(client, lambda h: h["active_calls"] == 1 and h["call_slices"] >= 2)
        assert before["active_calls"] == 1, before
        gaps, last = [], time.monotonic()
        while len(gaps) < 4:  # steps of the stream while the score runs (a read timeout fails the test)
            if next(lines).startswith("event: diffutron.step"):
                gaps.append(time.monotonic() - last)
                last = time.monotonic()
        during = client.get("/health").json()
        assert during["active_calls"] == 1, "the score should still run"
        # one slice of the score per step of the stream, however large the score (one or two more at the ends)
        assert 1 <= during["call_slices"] - before["call_slices"] <= len(gaps) + 2, (before, during)
        assert max(gaps) < 20, gaps  # seconds: a step and a slice, even on a busy machine
        sock.close()
        stopped = health_until(client, lambda h: h["active_calls"] == 0, seconds=30)
        assert stopped["active_calls"] == 0 and stopped["cancelled_calls"] == 1 and stopped["calls"] == 0
        time.sleep(0.5)
        assert client.get("/health").json()["call_slices"] == stopped["call_slices"]  # nothing more of it runs


def test_a_sliced_score_is_the_library_evaluate(lm):  # noqa: F811
    """Batched by tokens and run a pass at a time, the score is evaluate()'s: several windows of mixed lengths."""
    from diffutron.evaluate import evaluate

    texts = ["Ankara Türkiye'nin başkentidir. " * 12, "İstanbul en büyük şehirdir.", "a b c"]
    options = {"samples": 2, "elbo_samples": 3, "seed": 4}
    with serving(create_app(lm)) as url, httpx.Client(base_url=url, timeout=60) as client:
        score = client.post("/v1/score", json={"text": texts, **options}).json()
        assert client.get("/health").json()["call_slices"] > 2
    expected = evaluate(lm, texts, **options)
    assert score["windows"] == expected.windows > 2
    for key in ("ppl", "elbo_ppl", "elbo_ppl_stderr", "tokens", "masked_tokens", "top1", "top5", "pass_ppl"):
        assert score[key] == pytest.approx(getattr(expected, key), rel=1e-5), key


# -- item 8: a fault in the engine loop -------------------------------------------------------------------
@pytest.mark.parametrize("point", ["_dispatch", "_delta", "_canvas", "_cancel"])
def test_an_engine_fault_answers_every_request_and_turns_health_to_503(lm, monkeypatch, point):  # noqa: F811
    """A bug at any point of the loop stops the engine: the stream in the batch gets an error event and
    [DONE], the request waiting for room and the score running get a 500, the call not yet taken and
    every later request a 503, and /health a 503 (`failed`)."""
    armed = threading.Event()
    original = getattr(Engine, point)

    def faulty(self, *args, **kwargs):
        if armed.is_set():
            raise RuntimeError(f"injected fault in {point}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, point, faulty)
    with (
        serving(create_app(lm, max_batch=1)) as url,
        httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=20)) as client,
        client.stream("POST", "/v1/completions", json=LONG_STREAM) as stream,
    ):
        lines = stream.iter_lines()
        first_data(lines)  # the stream holds the only row
        waiting = Background(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
        scoring = Background(url, "/v1/score", LONG_SCORE)
        health_until(client, lambda h: h["queued"] == 1 and h["active_calls"] == 1)
        not_taken = Background(url, "/v1/fill-mask", {"text": "Ankara <mask> başkentidir."})
        assert health_until(client, lambda h: h["queued"] == 2)["queued"] == 2
        armed.set()
        events = rest_of(lines)
        assert events[-1] == (None, "[DONE]")
        assert f"injected fault in {point}" in events[-2][1]["error"]["message"]
        for request in (waiting, scoring):
            reply = request.wait(20)
            assert reply.status_code == 500 and "the engine stopped" in reply.json()["error"]["message"]
        reply = not_taken.wait(20)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "unavailable"
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        later = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert later.status_code == 503 and "internal error" in later.json()["error"]["message"]


# -- the process: an engine failure, SIGTERM ----------------------------------------------------------------
def start_server(*args: str, patch: str = "") -> tuple[subprocess.Popen, str]:
    """`diffutron serve --port 0 ARGS` in a process of its own (after running `patch`); (process, URL)."""
    code = f"import sys\n{patch}\nfrom diffutron.cli import main\nsys.exit(main(['serve', '--port', '0', *{args!r}]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    while "serving" not in line:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
    url = line.split(" at ")[1].split()[0]
    for _ in range(200):
        try:
            httpx.get(url + "/health", timeout=5)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    return process, url


def stopped(process: subprocess.Popen, seconds: float) -> tuple[int, str]:
    try:
        _, log = process.communicate(timeout=seconds)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, log


def test_an_engine_failure_ends_the_process_with_a_non_zero_exit():
    """A supervisor sees an engine failure: the request gets its 500, then the process exits 1."""
    patch = (
        "from diffutron.serve.engine import Engine\n"
        "def broken(self, *args): raise RuntimeError('injected fault')\n"
        "Engine._dispatch = broken"
    )
    process, url = start_server(patch=patch)
    try:
        reply = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
        assert reply.status_code == 500 and "injected fault" in reply.json()["error"]["message"]
    finally:
        code, log = stopped(process, 30)
    assert code == 1, log
    assert "error: the engine stopped: RuntimeError: injected fault" in log


def test_sigterm_answers_every_request_in_flight_and_exits_0():
    """SIGTERM with a stream, a long completion, a short one and the largest score in flight: new requests
    get a 503, the score at once (it could take minutes); a completion that finishes within the grace
    period (5 s) gets its answer, the others an OpenAI error (the stream: an error event, then [DONE]);
    the process exits 0 in bounded time. (Idle, it exits 0 too: test_serve.py's test of the command.)"""
    process, url = start_server("--max-batch", "3")
    try:
        with (
            httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=30)) as client,
            client.stream("POST", "/v1/completions", json=LONG_STREAM) as stream,
        ):
            lines = stream.iter_lines()
            first_data(lines)
            long = Background(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 400})
            scoring = Background(url, "/v1/score", MAX_SCORE)
            health_until(client, lambda h: h["active_rows"] == 2 and h["active_calls"] == 1)
            short = Background(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
            health_until(client, lambda h: h["requests"] == 3)
            process.send_signal(signal.SIGTERM)
            asked = time.monotonic()
            reply = scoring.wait(30)
            assert reply.status_code == 503 and "shutting down" in reply.json()["error"]["message"]
            assert short.wait(30).status_code == 200
            events = rest_of(lines)
            assert events[-1] == (None, "[DONE]") and "shutting down" in events[-2][1]["error"]["message"]
            reply = long.wait(30)
            assert reply.status_code == 503 and "shutting down" in reply.json()["error"]["message"]
        code, log = stopped(process, 30)
        assert code == 0, log
        assert time.monotonic() - asked < 15  # the grace period, a step, the connections closing
        assert "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()
