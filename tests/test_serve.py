"""`diffutron serve`: every endpoint against the library on the shipped tiny model, streaming, the official
openai client, step-level batching (concurrent = sequential), disconnects, and the error paths.

The servers run in-process on 127.0.0.1 (a free port); requests are few and short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from at_once import at_once
from rows_alone import compute_rows_alone

from diffutron.serve import create_app, serving
from diffutron.serve.engine import _stop_prefix

PROMPT = "Türkiye'nin en büyük şehri"


@pytest.fixture(scope="module")
def lm():
    from diffutron.model import DiffusionLM

    return DiffusionLM.from_pretrained("tiny-diffutron", device="cpu")


@pytest.fixture(scope="module")
def base(lm):
    with serving(create_app(lm, max_batch=16, max_queue=64)) as url:
        yield url


@pytest.fixture
def client(base):
    with httpx.Client(base_url=base, timeout=120) as c:
        yield c


def events_of(response) -> list[tuple[str | None, object]]:
    """(event name, parsed data) of a Server-Sent Events response; the last data is "[DONE]"."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            events.append((name, data if data == "[DONE]" else json.loads(data)))
            name = None
    return events


def stream(client, path: str, body: dict) -> list[tuple[str | None, object]]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return events_of(response)


def streamed_text(events, chat: bool = False) -> dict[int, str]:
    texts: dict[int, str] = {}
    for name, data in events:
        if name is None and data != "[DONE]":
            for choice in data["choices"]:
                piece = choice["delta"].get("content", "") if chat else choice["text"]
                texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts


def library_generate(lm, prompts, max_tokens, **settings):
    from diffutron.sampling import generate, user_config

    return generate(lm, prompts, max_tokens, user_config("generate", **settings))


# -- endpoints against the library ---------------------------------------------------------------
def test_health_models_and_page(client, lm):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == lm.name == "tiny-diffutron"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [lm.name]
    assert client.get(f"/v1/models/{lm.name}").json()["context_length"] == lm.context_length
    page = client.get("/")
    assert page.status_code == 200 and "<title>diffutron</title>" in page.text
    # offline: the page loads nothing from elsewhere
    assert 'src="http' not in page.text and 'href="http' not in page.text and "@import" not in page.text


def test_completion_is_the_library_generate(client, lm):
    reply = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "stop": [" ve millet"]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = library_generate(lm, [PROMPT], 12, stop=[" ve millet"])
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert choice["text"] == expected.texts[0]
    assert choice["finish_reason"] == {"eos": "stop", "stop": "stop", "length": "length"}[expected.finished_by[0]]
    prompt_tokens = len(lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(expected.token_ids[0]),
        "total_tokens": prompt_tokens + len(expected.token_ids[0]),
        "forward_passes": expected.forward_passes,
    }


def test_prompt_list_n_and_seeds(client, lm):
    """Row i of a request draws with seed + i, as in the library: a seeded request is reproducible."""
    prompts = ["Ankara", "Bugün hava"]
    settings = {"temperature": 0.9, "top_p": 0.95, "seed": 5, "steps": 4, "block_length": 4}
    body = client.post("/v1/completions", json={"prompt": prompts, "n": 2, "max_tokens": 8, **settings}).json()
    expected = library_generate(lm, ["Ankara", "Ankara", "Bugün hava", "Bugün hava"], 8, **settings)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == expected.texts
    assert body["usage"]["forward_passes"] == 4


def test_stream_deltas_concatenate_to_the_text(client):
    """Deltas carry only final text, so they add up to the whole completion, stop strings included
    (a tail that may start a stop string is held back until it is known)."""
    for stop in ([], [" ve millet"], ["ve", "."], ["milliye ve"]):
        body = {"prompt": PROMPT, "max_tokens": 24, "stop": stop}
        whole = client.post("/v1/completions", json=body).json()
        events = stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
        assert events[-1] == (None, "[DONE]")
        assert streamed_text(events) == {0: whole["choices"][0]["text"]}, stop
        chunks = [data for name, data in events[:-1] if name is None]
        assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stream_canvas_shows_each_step(client, lm):
    events = stream(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "stream_canvas": True})
    steps = [data for name, data in events if name == "diffutron.step"]
    text = streamed_text(events)[0]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    masks = [s["state"].count("m") for s in steps]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0 and len(steps) == 10
    for s in steps:  # one new token per step (the default schedule), the prompt given
        assert len(s["tokens"]) == len(s["state"]) and s["state"].count("n") == 1
        assert "".join(t for t, c in zip(s["tokens"], s["state"], strict=True) if c == "p") == PROMPT
    last = steps[-1]
    assert "".join(t for t, c in zip(last["tokens"], last["state"], strict=True) if c in "nc") == text


def test_chat_renders_messages_as_sft_does(client, lm):
    from diffutron.chat import render_prompt

    messages = [{"role": "system", "content": "Kısa yanıt ver."}, {"role": "user", "content": "Ankara nerede?"}]
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12}).json()
    expected = library_generate(lm, [render_prompt(lm.tokenizer, messages)], 12)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.texts[0]}
    events = stream(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 12})
    chunks = [data for name, data in events if name is None and data != "[DONE]"]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(events, chat=True) == {0: expected.texts[0]}


def test_infill_fill_mask_and_score_are_the_library(client, lm):
    from diffutron.evaluate import evaluate
    from diffutron.fill_mask import fill_mask
    from diffutron.sampling import infill, user_config

    text = "Ankara <mask*3> başkentidir."
    body = client.post("/v1/infill", json={"text": [text, "Bugün <mask> güzel."]}).json()
    expected = infill(lm, [text, "Bugün <mask> güzel."], user_config("infill"))
    assert [c["text"] for c in body["choices"]] == expected.texts
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["forward_passes"] == expected.forward_passes
    events = stream(client, "/v1/infill", {"text": text})
    steps = [data for name, data in events if name == "diffutron.step"]
    assert [s["state"].count("m") for s in steps] == [2, 1, 0] and events[-1] == (None, "[DONE]")
    assert events[-2][1]["choices"][0]["text"] == expected.texts[0]

    masks = client.post("/v1/fill-mask", json={"text": "Ankara <mask> başkentidir.", "top_k": 3}).json()["masks"]
    assert masks == [
        {"index": 0, "candidates": [c.to_dict() for c in fill_mask(lm, "Ankara <mask> başkentidir.", 3)[0]]}
    ]

    texts = ["Ankara Türkiye'nin başkentidir.", "İstanbul en büyük şehirdir."]
    score = client.post("/v1/score", json={"text": texts, "samples": 2, "elbo_samples": 4, "seed": 1}).json()
    result = evaluate(lm, texts, samples=2, elbo_samples=4, seed=1)
    assert score["object"] == "diffutron.score"
    for key in ("ppl", "ppl_stderr", "elbo_ppl", "elbo_ppl_stderr", "tokens", "masked_tokens"):
        assert score[key] == pytest.approx(getattr(result, key)), key
    assert score["ppl_stderr"] is not None and score["elbo_ppl_stderr"] is not None


# -- the official client ----------------------------------------------------------------------------
def test_openai_client_completes_streams_and_chats(base, client, lm):
    import openai

    api = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    extra = {"steps": 8}
    direct = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, **extra}).json()
    done = api.completions.create(model=lm.name, prompt=PROMPT, max_tokens=8, extra_body=extra)
    assert done.choices[0].text == direct["choices"][0]["text"] and done.usage.completion_tokens == 8
    chunks = api.completions.create(model=lm.name, prompt=PROMPT, max_tokens=8, stream=True, extra_body=extra)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct["choices"][0]["text"]

    messages = [{"role": "user", "content": "Merhaba"}]
    direct = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8}).json()
    chat = api.chat.completions.create(model=lm.name, messages=messages, max_tokens=8)
    assert chat.choices[0].message.content == direct["choices"][0]["message"]["content"]
    chunks = api.chat.completions.create(model=lm.name, messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        api.completions.create(model=lm.name, prompt=PROMPT, max_tokens=4, logprobs=2)


# -- batching -----------------------------------------------------------------------------------------
CONCURRENT = [  # different prompts, lengths and settings (three batch groups), all reproducible
    {"prompt": PROMPT, "max_tokens": 16},
    {"prompt": "Ankara", "max_tokens": 8},
    {"prompt": "Bugün hava çok", "max_tokens": 12, "stop": ["."]},
    {"prompt": "Mustafa Kemal", "max_tokens": 16, "block_length": 8},
    {"prompt": "", "max_tokens": 8},
    {"prompt": "İstanbul", "max_tokens": 12, "policy": "margin"},
    {"prompt": "Cumhuriyet", "max_tokens": 8, "temperature": 0.8, "seed": 3},
    {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "seed": 4, "stream": True},
    {"prompt": "Ankara", "max_tokens": 16, "block_length": 8, "cache": "prefix"},
]


def run_request(client, body) -> dict:
    if body.get("stream"):
        events = stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
        return {"text": streamed_text(events)[0], "passes": events[-2][1]["usage"]["forward_passes"]}
    reply = client.post("/v1/completions", json=body).json()
    return {"text": reply["choices"][0]["text"], "passes": reply["usage"]["forward_passes"]}


def test_concurrent_requests_share_steps_and_equal_sequential(client, base, monkeypatch):
    """Concurrent requests share forward passes, and each gets its sequential text: with the encoder computing
    each row alone (tests/rows_alone.py), as the engine guarantees; with the batched encoder, rounding can
    tip a near tie (docs/serve.md)."""
    compute_rows_alone(monkeypatch)
    sequential = [run_request(client, body) for body in CONCURRENT]
    before = client.get("/health").json()
    results = at_once(base, CONCURRENT, run_request)
    after = client.get("/health").json()
    assert [r["text"] for r in results] == [r["text"] for r in sequential]
    # the requests shared forward passes: fewer passes than they took one at a time
    alone = sum(r["passes"] for r in sequential)
    assert after["forward_passes"] - before["forward_passes"] < alone
    assert after["rows_stepped"] - before["rows_stepped"] == alone  # each row stepped as often as alone
    assert after["active_rows"] == 0 and after["queued"] == 0


def test_cached_requests_share_a_batch_and_equal_alone(client, base, monkeypatch):
    """Each row refreshes the approximate cache on its own rhythm, so a cached request joining a running
    cached batch mid-block shares its passes and both texts are what each gets alone (the encoder
    computing each row alone, tests/rows_alone.py: the rounding of the batched one taken out)."""
    compute_rows_alone(monkeypatch)
    cached = {"prompt": "Ankara", "max_tokens": 16, "block_length": 8, "cache": "prefix"}
    alone = client.post("/v1/completions", json=cached).json()["choices"][0]["text"]
    running = {"prompt": PROMPT, "max_tokens": 48, "block_length": 8, "cache": "prefix", "stream_canvas": True}
    running_alone = streamed_text(stream(client, "/v1/completions", running))[0]
    with (
        httpx.Client(base_url=base, timeout=120) as other,
        other.stream("POST", "/v1/completions", json={**running, "stream": True}) as first,
    ):
        lines, seen = first.iter_lines(), []
        while not (seen := [*seen, next(lines)])[-1].startswith("data:"):  # the first cached request is running
            pass
        beside: dict = {}
        joining = threading.Thread(target=lambda: beside.update(client.post("/v1/completions", json=cached).json()))
        joining.start()
        for _ in range(2000):
            health = client.get("/health").json()
            if health["active_requests"] == 2 or not joining.is_alive():
                break
            time.sleep(0.01)
        assert health["active_requests"] == 2 and health["groups"] == 1
        joining.join(120)
        streamed = streamed_text(events_of(SimpleNamespace(iter_lines=lambda: iter(seen + list(lines)))))
    assert beside["choices"][0]["text"] == alone and streamed[0] == running_alone


def test_client_disconnect_releases_rows(client, base):
    before = client.get("/health").json()["cancelled_rows"]
    body = {"prompt": PROMPT, "max_tokens": 256, "stream": True, "stream_canvas": True}  # an event each step
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data:"):
            pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = client.get("/health").json()
        if health["active_rows"] == 0:
            break
        time.sleep(0.05)
    assert health["active_rows"] == 0 and health["cancelled_rows"] == before + 1
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).status_code == 200


# -- errors ---------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "a", "max_tokens": ', "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "body"),
    ("/v1/completions", {"prompt": 1}, "prompt: expected str or list[str]"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "a", "stpes": 4}, "unknown field 'stpes'"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "steps": True}, "steps"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "a", "policy": "best"}, "unknown policy"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 8, "block_length": 3}, "block_length 3"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 8, "steps": 3, "block_length": 4}, "multiple"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10**6}, "context"),
    ("/v1/completions", {"prompt": "kelime " * 600, "max_tokens": 8}, "context"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "--max-batch"),
    ("/v1/completions", {"prompt": "a", "n": 10**12}, "--max-batch"),
    ("/v1/completions", {"prompt": ["a"] * 20}, "--max-batch"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 8, "steps": 10**12}, "reveal nothing"),
    ("/v1/completions", {"prompt": [], "max_tokens": 4}, "empty"),
    ("/v1/completions", {"prompt": "a", "logprobs": 1}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "/v1/infill"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "stream_canvas": True}, "stream"),
    ("/v1/completions", {"prompt": "a", "stop": ["x"] * 17}, "stop"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs"),
    ("/v1/infill", {"text": "no masks here"}, "no <mask>"),
    ("/v1/infill", {"text": "a <mask*0> b"}, "mask*0"),
    ("/v1/infill", {"text": "a <mask*999999999999> b"}, "context"),
    ("/v1/infill", {"text": "a <mask*2> b", "steps": 3}, "reveal nothing"),
    ("/v1/fill-mask", {"text": "a <mask> b", "top_k": 0}, "top_k"),
    ("/v1/score", {"text": ""}, "nothing to score"),
    ("/v1/score", {"text": "a b c", "mask_ratio": 1.5}, "mask ratio"),
    ("/v1/score", {"text": "a" * 30_000}, "characters"),
    ("/v1/score", {"text": "a b c", "elbo_samples": 1000}, "elbo_samples"),
]


@pytest.mark.parametrize("path,body,message", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_400_with_an_openai_error(client, path, body, message):
    if isinstance(body, bytes):
        reply = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        reply = client.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]
    assert "\n" not in error["message"]


def test_other_errors_and_the_server_survives(client, lm):
    reply = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()
    assert client.get("/v1/completions").status_code == 405
    big = client.post("/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert big.status_code == 413 and "error" in big.json()
    chunked = client.post(  # no Content-Length: counted as it arrives
        "/v1/completions", content=(b"x" * (1 << 16) for _ in range(32)), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413 and "error" in chunked.json()
    health = client.get("/health").json()
    assert health["active_rows"] == 0 and health["queued"] == 0
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).status_code == 200


def test_a_failing_step_fails_its_requests_only(client, monkeypatch):
    from diffutron.sampling import Denoiser

    def broken(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Denoiser, "step", broken)
    reply = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert reply.status_code == 500 and "out of memory" in reply.json()["error"]["message"]
    events = stream(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert "out of memory" in events[-2][1]["error"]["message"] and events[-1] == (None, "[DONE]")
    monkeypatch.undo()
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).status_code == 200
    assert client.get("/health").json()["active_rows"] == 0


def test_queue_full_gets_429(lm):
    with serving(create_app(lm, max_batch=1, max_queue=1)) as url, httpx.Client(base_url=url, timeout=60) as c:
        long = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "stream_canvas": True}  # an event each step
        with c.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()
            while not next(lines).startswith("data:"):  # the first request holds the batch's only row
                pass
            waiting = threading.Thread(target=lambda: c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}))
            waiting.start()
            while c.get("/health").json()["queued"] < 1:
                time.sleep(0.02)
            refused = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            assert refused.headers["retry-after"] == "1"
        waiting.join(60)  # the first stream closed: its row left, the waiting request ran
        assert not waiting.is_alive() and c.get("/health").json()["requests"] == 2


def test_api_key(lm):
    import openai

    with serving(create_app(lm, api_key="sesame")) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/v1/models").status_code == 401
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert c.post("/v1/completions", json={"prompt": "a"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        assert openai.OpenAI(base_url=url + "/v1", api_key="sesame").models.list().data[0].id == lm.name


def test_stop_prefix_holds_back_what_may_start_a_stop():
    assert _stop_prefix("Ankara ve", (" ve millet",)) == 3
    assert _stop_prefix("Ankara v", (" ve millet", "a vx")) == 3
    assert _stop_prefix("Ankara", (" ve",)) == 0
    assert _stop_prefix("", (" ve",)) == 0
    assert _stop_prefix("abc", ("c",)) == 0  # a whole stop string is found, not held


# -- the command --------------------------------------------------------------------------------
def test_serve_command_starts_and_refuses_a_busy_port(tmp_path):
    from diffutron.cli import main
    from diffutron.serve import bind

    busy = bind("127.0.0.1", 0)
    busy.listen()
    try:
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffutron", "serve", "--port", "0", "--max-batch", "4"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = ""
        while "serving" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the server exited"
        url = line.split(" at ")[1].split()[0]
        for _ in range(200):
            try:
                health = httpx.get(url + "/health", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert health["model"] == "tiny-diffutron" and health["max_batch"] == 4
        reply = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=60)
        assert reply.status_code == 200
        process.terminate()  # a graceful stop, answered with exit 0 (uvicorn's re-raised SIGTERM is taken)
        _, log = process.communicate(timeout=30)
        assert process.returncode == 0 and "Application shutdown complete" in log
        assert "completion rows=1 prompt_tokens=6 completion_tokens=4 steps=4 forward_passes=4" in log
    finally:
        if process.poll() is None:
            process.kill()
