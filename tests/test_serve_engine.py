"""The serving engine under faults and load: a request waiting for room once the batch empties, a
client gone before its non-streaming answer.

Servers run on 127.0.0.1 (a free port), in-process unless the test is about the process itself; every
wait is bounded.
"""

from __future__ import annotations

import threading
import time

import httpx
from test_serve import PROMPT, lm  # noqa: F401 -- lm is a fixture

from diffutron.serve import create_app, serving


def health_until(client: httpx.Client, done, seconds: float = 30.0) -> dict:
    """Poll /health until done(health) or `seconds` pass; the last health."""
    deadline = time.monotonic() + seconds
    while True:
        health = client.get("/health").json()
        if done(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.02)


def test_a_request_waiting_for_room_runs_once_the_batch_empties(lm):  # noqa: F811
    """The hostile-client sequence: n=16 fills --max-batch 16, a second request comes 0.3 s later and
    waits for room; when the first finishes the batch is empty and the second must run (it used to wait
    until its client gave up: the engine slept while a request waited)."""
    with serving(create_app(lm, max_batch=16)) as url, httpx.Client(base_url=url, timeout=60) as client:
        replies: dict = {}

        def post(name, body):
            with httpx.Client(base_url=url, timeout=60) as own:
                replies[name] = own.post("/v1/completions", json=body)

        first = threading.Thread(target=post, args=("first", {"prompt": "a", "n": 16, "max_tokens": 32}))
        second = threading.Thread(target=post, args=("second", {"prompt": "b", "max_tokens": 8}))
        first.start()
        time.sleep(0.3)
        second.start()
        queued = health_until(client, lambda h: h["queued"] == 1 or not first.is_alive())
        assert queued["queued"] == 1, "the second request should wait for room"
        first.join(60)
        second.join(20)  # 8 steps of one row
        assert not second.is_alive(), f"the second request hangs: {client.get('/health').json()}"
        assert replies["first"].status_code == 200 and replies["second"].status_code == 200
        assert len(replies["second"].json()["choices"]) == 1
        idle = client.get("/health").json()
        assert idle["queued"] == 0 and idle["active_rows"] == 0
