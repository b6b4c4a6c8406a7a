"""`diffutron serve`'s API edges (issue #21): what /health tells a client without the key, no local path in
any answer, fill-mask's size, lone surrogates, the Host check against DNS rebinding, a body that is not
sent as JSON, one rule for seeds, and prompts refused by their length before they are tokenised.

The fixtures and helpers are tests/test_serve.py's; servers run in-process on 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
from cli_run import run
from test_serve import PROMPT, base, client, lm  # noqa: F401  (fixtures)

from diffutron.serve import create_app, serving


# -- /health and the model's name --------------------------------------------------------------------
def test_health_without_the_key_says_only_up(lm):  # noqa: F811
    with serving(create_app(lm, api_key="sesame")) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/health", headers={"Authorization": "Bearer nope"}).json() == {"status": "ok"}
        full = c.get("/health", headers={"Authorization": "Bearer sesame"}).json()
        assert full["status"] == "ok" and full["model"] == lm.name and "forward_passes" in full


def test_no_local_path_in_any_answer(lm, tmp_path):  # noqa: F811
    """A model loaded from a folder is served under the folder's own name (a run's final/: the run's)."""
    from diffutron.model import DiffusionLM
    from diffutron.serve.app import served_name

    folder = tmp_path / "runs" / "sft-turkish" / "final"
    folder.mkdir(parents=True)
    local = DiffusionLM(lm.hf_model, lm.tokenizer, name=str(folder))
    with serving(create_app(local)) as url, httpx.Client(base_url=url, timeout=60) as c:
        answers = [
            c.get("/health"),
            c.get("/v1/models"),
            c.get("/v1/models/sft-turkish"),
            c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}),
            c.post("/v1/infill", json={"text": "Ankara <mask> başkentidir."}),
            c.post("/v1/fill-mask", json={"text": "Ankara <mask> başkentidir."}),
            c.post("/v1/completions", json={"model": "nope", "prompt": "a"}),
        ]
        assert [a.status_code for a in answers] == [200] * 6 + [404]
        assert all(str(tmp_path) not in a.text and "runs/" not in a.text for a in answers)
        assert answers[1].json()["data"][0]["id"] == "sft-turkish" == answers[0].json()["model"]
    with serving(create_app(local, model_name="mine")) as url:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "mine"
    assert served_name(str(folder.parent / "checkpoint-200" / "model")) == "checkpoint-200"
    assert served_name("tiny-diffutron") == "tiny-diffutron" and served_name("preset:tiny") == "preset:tiny"
    assert served_name("jhu-clsp/mmBERT-base") == "jhu-clsp/mmBERT-base"  # a hub id is no local path


# -- fill-mask's size -----------------------------------------------------------------------------------
def test_fill_mask_answers_are_bounded_and_sequences_only_when_asked(client, lm):  # noqa: F811
    from diffutron.fill_mask import fill_mask

    many = "Ankara " + "<mask> " * 20
    refused = client.post("/v1/fill-mask", json={"text": many, "top_k": 100})
    assert refused.status_code == 400 and "2,000 candidates" in refused.json()["error"]["message"]
    # the issue's request: 3.5 KB in was 179 MB out and 10-16 s of the engine's time
    issue = client.post("/v1/fill-mask", json={"text": "Ankara " + "<mask> " * 500, "top_k": 100})
    assert issue.status_code == 400 and issue.elapsed.total_seconds() < 2

    ten = "Ankara " + "<mask> " * 9 + "başkentidir."
    masks = client.post("/v1/fill-mask", json={"text": ten, "top_k": 100}).json()["masks"]  # 1,000: the most
    expected = fill_mask(lm, ten, 100, sequences=False)
    assert [m["candidates"] for m in masks] == [[c.to_dict() for c in m] for m in expected]
    assert all("sequence" not in c for m in masks for c in m["candidates"])
    asked = client.post("/v1/fill-mask", json={"text": ten, "top_k": 2, "sequences": True}).json()["masks"]
    assert [m["candidates"] for m in asked] == [[c.to_dict() for c in m] for m in fill_mask(lm, ten, 2)]
    one = client.post("/v1/fill-mask", json={"text": "Ankara <mask> başkentidir."}).json()["masks"]
    assert all(c["sequence"].startswith("Ankara") for c in one[0]["candidates"])  # one mask: sent by default
    bare = client.post("/v1/fill-mask", json={"text": "Ankara <mask> başkentidir.", "sequences": False}).json()
    assert all("sequence" not in c for c in bare["masks"][0]["candidates"])


# -- lone surrogates ------------------------------------------------------------------------------------
SURROGATES = [  # raw JSON: json.dumps would not write a lone surrogate
    ("/v1/completions", r'{"prompt": "Ankara \ud800"}', "prompt"),
    ("/v1/completions", r'{"prompt": ["a", "\udfff b"]}', "prompt.1"),
    ("/v1/completions", r'{"prompt": "a", "policy": "\ud800"}', "policy"),
    ("/v1/completions", r'{"prompt": "a", "stop": ["\ud800"]}', "stop.0"),
    ("/v1/completions", r'{"prompt": "a", "model": "\ud800"}', "model"),
    ("/v1/completions", r'{"prompt": "a", "\ud800": 1}', None),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/infill", r'{"text": "a <mask> \ud800"}', "text"),
    ("/v1/fill-mask", r'{"text": "a <mask> \ud800"}', "text"),
    ("/v1/score", r'{"text": "a b \ud800"}', "text"),
]  # fmt: skip


@pytest.mark.parametrize("path,raw,param", SURROGATES, ids=[str(i) for i in range(len(SURROGATES))])
def test_a_lone_surrogate_is_a_400_without_a_traceback(client, caplog, path, raw, param):  # noqa: F811
    with caplog.at_level(logging.INFO):
        reply = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "lone surrogate (\\ud" in error["message"] and "\n" not in error["message"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# -- the Host header (DNS rebinding) ----------------------------------------------------------------------
def status_for_host(url: str, host: str) -> int:
    return httpx.get(url + "/health", headers={"Host": host}, timeout=30).status_code


def test_a_loopback_server_answers_only_loopback_host_names(lm):  # noqa: F811
    from diffutron.serve.app import trusted_hosts

    with serving(create_app(lm, allowed_hosts=trusted_hosts("127.0.0.1"))) as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "127.0.0.1"):
            assert status_for_host(url, host) == 200, host
        for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example", "localhost.evil.example"):
            assert status_for_host(url, host) == 400, host  # a rebound name is refused before any route
        refused = httpx.post(url + "/v1/completions", json={"prompt": "a"}, headers={"Host": "evil.example"})
        assert refused.status_code == 400


def test_trusted_hosts():
    from diffutron.errors import UsageError
    from diffutron.serve.app import LOOPBACK_NAMES, trusted_hosts

    assert trusted_hosts("127.0.0.1") == trusted_hosts("::1") == trusted_hosts("127.0.0.2") == list(LOOPBACK_NAMES)
    assert trusted_hosts("0.0.0.0") is None and trusted_hosts("192.168.1.5") is None  # a LAN server: any name
    assert trusted_hosts("0.0.0.0", ["api.example.com"]) == [*LOOPBACK_NAMES, "api.example.com"]
    assert trusted_hosts("127.0.0.1", ["*.example.com"]) == [*LOOPBACK_NAMES, "*.example.com"]
    assert trusted_hosts("127.0.0.1", ["*"]) is None
    for bad in ("example.com:8000", "http://example.com", "ex*ample.com", "*example.com", "::1", " "):
        with pytest.raises(UsageError, match="allowed host"):
            trusted_hosts("127.0.0.1", [bad])


def test_the_serve_command_checks_the_host_header(monkeypatch, capsys):
    """The command's wiring: on 127.0.0.1 a foreign name is refused, `--allowed-hosts` adds names, a bad
    name is one line."""
    import diffutron.serve

    apps = []
    monkeypatch.setattr(diffutron.serve, "run", lambda app, sock: (apps.append(app), sock.close()))
    assert run(capsys, "serve", "--port", "0")[0] == 0
    assert run(capsys, "serve", "--port", "0", "--allowed-hosts", "*.example.com, api.test")[0] == 0
    for app, allowed in zip(apps, ([], ["x.example.com", "api.test"]), strict=True):
        with serving(app) as url:
            assert status_for_host(url, "localhost") == 200
            assert status_for_host(url, "evil.example") == 400
            assert all(status_for_host(url, host) == 200 for host in allowed)
    code, _, err = run(capsys, "serve", "--port", "0", "--allowed-hosts", "example.com:80")
    assert code == 2 and "without a port" in err and "Traceback" not in err


def test_serving_a_file_says_it_is_not_a_model_folder(capsys, tmp_path):
    a_file = tmp_path / "hosts"
    a_file.write_text("127.0.0.1 localhost\n")
    code, _, err = run(capsys, "serve", str(a_file), "--port", "0")
    assert code == 1 and "is not a model folder: it is a file" in err and "not found" not in err


# -- the body -----------------------------------------------------------------------------------------------
def test_a_body_not_sent_as_json_says_so(client):  # noqa: F811
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}, {}):
        reply = client.post("/v1/completions", content=b'{"prompt": "a", "max_tokens": 2}', headers=headers)
        assert reply.status_code == 400
        message = reply.json()["error"]["message"]
        got = headers.get("content-type") or "no Content-Type"
        assert "Content-Type: application/json" in message and got in message
    ok = client.post("/v1/completions", content=b'{"prompt": "a", "max_tokens": 2}',
                     headers={"content-type": "application/json; charset=utf-8"})  # fmt: skip
    assert ok.status_code == 200


def test_a_bad_content_length_is_a_plain_400_from_uvicorn(base):  # noqa: F811
    """As docs/serve.md says: framing errors are answered below the app, in plain text."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n")
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 400") and "text/plain" in answer
    assert httpx.get(base + "/health").status_code == 200


def test_one_rule_for_seeds(client):  # noqa: F811
    from diffutron.sampling.config import MAX_SEED

    too_big = [
        client.post("/v1/score", json={"text": "Ankara başkenttir.", "seed": 2**64}),
        client.post("/v1/completions", json={"prompt": "a", "seed": 2**64}),
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "seed": 2**63}),
        client.post("/v1/infill", json={"text": "a <mask> b", "seed": -1}),
    ]
    assert [r.status_code for r in too_big] == [400] * 4
    assert len({r.json()["error"]["message"] for r in too_big[:3]}) == 1  # the same words from every route
    assert str(MAX_SEED) in too_big[0].json()["error"]["message"] and too_big[3].json()["error"]["param"] == "seed"
    assert client.post("/v1/score", json={"text": "Ankara başkenttir.", "seed": MAX_SEED}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "seed": MAX_SEED}).status_code == 200


# -- long texts are refused before they are tokenised ----------------------------------------------------
@pytest.fixture
def tokenizer_calls(lm, monkeypatch):  # noqa: F811
    """Every call of the served tokenizer (text -> ids), counted."""
    calls = []
    kind = type(lm.tokenizer)
    original = kind.__call__
    monkeypatch.setattr(kind, "__call__", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    return calls


LONG = "kelime " * 140_000  # 980,000 characters: under the 1 MiB body limit, 140,000 tokens


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": LONG}, "prompt"),
        ("/v1/completions", {"prompt": ["Ankara", LONG[:200_000]]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
        ("/v1/infill", {"text": LONG + "<mask>"}, "text"),
        ("/v1/fill-mask", {"text": LONG + "<mask>"}, "text"),
    ],
    ids=["prompt", "prompts", "chat", "infill", "fill-mask"],
)
def test_a_text_too_long_for_the_context_is_refused_before_tokenising(client, tokenizer_calls, path, body, param):  # noqa: F811
    reply = client.post(path, json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert "characters long: more than the model's context of 512 tokens" in reply.json()["error"]["message"]
    assert tokenizer_calls == []  # nothing tokenised: the engine thread never saw it


def test_a_prompt_to_truncate_may_be_long(client, lm):  # noqa: F811
    long = "Türkiye'nin başkenti Ankara'dır. " * 1_000  # 33,000 characters, over the bound; its end is kept
    reply = client.post("/v1/completions", json={"prompt": long, "max_tokens": 4, "truncate_prompt": True})
    room = lm.context_length - len(lm.special_affixes[0]) - 4
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == room


def test_the_character_bound_holds_for_the_tokenizer(lm):  # noqa: F811
    """The bound refuses a text only when it has more tokens than the context: every token stands for at
    most `longest_token_chars` characters. Checked on texts made to have few tokens per character."""
    from diffutron.serve.schemas import longest_token_chars

    longest = longest_token_chars(lm.tokenizer)
    vocab = sorted(lm.tokenizer.get_vocab(), key=len)[-50:]
    texts = [
        "Türkiye Cumhuriyeti'nin başkenti Ankara'dır. " * 40,
        " " * 5_000, "\n" * 3_000, "a" * 5_000, "0" * 5_000, "=" * 5_000, "ğüşıöç" * 500, "🙂" * 500,
        "e\u0301" * 1_000, "\x00\x01" * 1_000, "".join(chr(c) for c in range(32, 3_000)),
        " milletvekillerinin" * 300, "".join(lm.tokenizer.convert_tokens_to_string([t]) for t in vocab) * 10,
    ]  # fmt: skip
    for text in texts:
        tokens = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert tokens * longest >= len(text), text[:40]
