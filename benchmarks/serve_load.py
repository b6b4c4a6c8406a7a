"""Load on `diffutron serve`: N concurrent streaming clients vs the same requests one at a time.

    python benchmarks/serve_load.py [--json] [--model tiny-diffutron] [--clients 8] [--max-tokens 64]
        [--block-length N] [--cache none|prefix|dual] [--library]

Starts `diffutron serve MODEL --port 0` (loopback only) in its own process and sends it N streaming
completions with different held-out prompts (greedy, the server's defaults): one after the other and
all N at once, for `--rounds` rounds, the order of the two phases alternating from round to round (a
load that drifts over the run weighs on both alike). Each request is the official OpenAI streaming shape
(`stream: true`, `stream_options.include_usage`). Reported: aggregate completion tokens/s of each
phase and their ratio (`speedup`), whether every request got the same text in both phases
(`identical`), latency p50/p95 of the concurrent phase (`p50_s`, `p95_s`), the time to the first
committed token (the first non-empty delta), and the same ratio in the server's CPU seconds
(`cpu_speedup`: the work saved, whatever else runs on the machine), and the server's forward passes
and rows stepped in each phase (`sequential_forward_passes`, ...). Bounded: N <= 64 clients,
`--time-limit` seconds in all. With --json, stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx

MAX_CLIENTS = 64


def prompts(n: int, words: int = 6) -> list[str]:
    """The first `words` words of n held-out documents."""
    from diffutron.data import read_documents

    found = []
    for doc in read_documents("bundled:heldout"):
        text = " ".join(doc.text.split()[:words])
        if len(text.split()) == words and text not in found:
            found.append(text)
        if len(found) == n:
            return found
    raise SystemExit("not enough held-out prompts")


def start_server(model: str, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "diffutron", "serve", model, "--port", "0", "--max-batch", str(max_batch)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    while " at http://127.0.0.1:" not in line:
        line = server.stderr.readline()
        if not line and server.poll() is not None:
            raise SystemExit(f"the server did not start (exit {server.returncode})")
    url = line.split(" at ")[1].split()[0]
    threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its log pipe drained
    for _ in range(600):
        try:
            httpx.get(url + "/health", timeout=5)
            return server, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit("the server does not answer")


def server_counts(url: str, pid: int) -> dict:
    """The server's counters that a phase adds to: its CPU seconds, forward passes, rows stepped."""
    health = httpx.get(url + "/health", timeout=10).json()
    return {"cpu_s": cpu_seconds(pid), "forward_passes": health["forward_passes"], "rows": health["rows_stepped"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads): what the work cost, whatever else runs."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_request(url: str, body: dict, deadline: float) -> dict:
    """Stream one completion: its text, tokens, latency and time to the first committed token."""
    start = time.perf_counter()
    first, text, usage = None, "", None
    timeout = max(1.0, deadline - time.monotonic())
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter() - start
                text += choice["text"]
    return {
        "text": text,
        "tokens": usage["completion_tokens"],
        "passes": usage["forward_passes"],
        "latency_s": time.perf_counter() - start,
        "first_token_s": first,
    }


def sequential(url: str, bodies: list[dict], deadline: float) -> tuple[list[dict], float]:
    start = time.perf_counter()
    results = [one_request(url, body, deadline) for body in bodies]
    return results, time.perf_counter() - start


def concurrent(url: str, bodies: list[dict], deadline: float) -> tuple[list[dict], float]:
    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies) + 1)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = one_request(url, bodies[i], deadline)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    if any(r is None for r in results):
        raise SystemExit("a concurrent request did not finish in time")
    return results, time.perf_counter() - start


def library_ceiling(model: str, prompts_: list[str], max_tokens: int, settings: dict, threads: int | None) -> dict:
    """The same generations through the library in this process: one prompt at a time vs one batch --
    the most that sharing forward passes can give with this sampler, whatever the server does."""
    import torch

    from diffutron.model import DiffusionLM
    from diffutron.sampling import generate, user_config

    if threads:
        torch.set_num_threads(threads)
    lm = DiffusionLM.from_pretrained(model, device="cpu")
    config = user_config("generate", **settings)
    generate(lm, prompts_[:1], max_tokens, config)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    alone = [generate(lm, [p], max_tokens, config).texts[0] for p in prompts_]
    alone_wall, alone_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    together = generate(lm, prompts_, max_tokens, config).texts
    together_wall, together_cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "library_speedup": alone_wall / together_wall,
        "library_cpu_speedup": alone_cpu / together_cpu,
        "library_texts": together if together == alone else None,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default="tiny-diffutron")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=None, help="semi-autoregressive blocks [default: none]")
    parser.add_argument("--cache", default=None, help="none, prefix or dual [default: the server's]")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server [default: torch's]")
    parser.add_argument("--library", action="store_true", help="also the library's own batching ratio (the ceiling)")
    parser.add_argument("--time-limit", type=float, default=1200.0, help="seconds for the whole run, at most")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS:
        raise SystemExit(f"--clients must be in [1, {MAX_CLIENTS}]")
    deadline = time.monotonic() + args.time_limit

    settings = {"block_length": args.block_length, "cache": args.cache}
    settings = {k: v for k, v in settings.items() if v is not None}
    texts = prompts(args.clients)
    bodies = [
        {
            "prompt": p,
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            **settings,
        }
        for p in texts
    ]
    server, url = start_server(args.model, args.clients, args.threads)
    try:
        one_request(url, bodies[0], deadline)  # warm-up
        rounds = []
        spent = {phase: dict.fromkeys(("cpu_s", "forward_passes", "rows"), 0.0) for phase in ("alone", "together")}
        for round_ in range(args.rounds):
            phases = {"alone": sequential, "together": concurrent}
            order = ["alone", "together"] if round_ % 2 == 0 else ["together", "alone"]
            done = {}
            for phase in order:  # each phase's own share of the server's counters
                before = server_counts(url, server.pid)
                done[phase] = phases[phase](url, bodies, deadline)
                after = server_counts(url, server.pid)
                for key in spent[phase]:
                    spent[phase][key] += after[key] - before[key]
            rounds.append((*done["alone"], *done["together"]))
    finally:
        server.terminate()
        server.wait(30)

    tokens = sum(r["tokens"] for alone, _, _, _ in rounds for r in alone)
    alone_s = sum(r[1] for r in rounds)
    together_s = sum(r[3] for r in rounds)
    together = [r for _, _, t, _ in rounds for r in t]
    alone = [r for a, _, _, _ in rounds for r in a]
    identical = all([r["text"] for r in a] == [r["text"] for r in t] for a, _, t, _ in rounds)
    identical = identical and all([r["text"] for r in rounds[0][0]] == [r["text"] for r in a] for a, *_ in rounds)
    firsts = [r["first_token_s"] for r in together if r["first_token_s"] is not None]
    firsts_alone = [r["first_token_s"] for r in alone if r["first_token_s"] is not None]
    report = {
        "model": args.model,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "block_length": args.block_length,
        "cache": args.cache,
        "rounds": args.rounds,
        "completion_tokens": tokens,
        "sequential_tokens_per_s": tokens / alone_s,
        "concurrent_tokens_per_s": sum(r["tokens"] for r in together) / together_s,
        "speedup": (sum(r["tokens"] for r in together) / together_s) / (tokens / alone_s),
        "identical": identical,
        "p50_s": statistics.median(r["latency_s"] for r in together),
        "p95_s": percentile([r["latency_s"] for r in together], 0.95),
        "sequential_p50_s": statistics.median(r["latency_s"] for r in alone),
        "first_token_p50_s": statistics.median(firsts) if firsts else None,
        "sequential_first_token_p50_s": statistics.median(firsts_alone) if firsts_alone else None,
        # the server's CPU seconds per phase: the ratio of the work, robust to other load on the machine
        "sequential_server_cpu_s": spent["alone"]["cpu_s"],
        "concurrent_server_cpu_s": spent["together"]["cpu_s"],
        "cpu_speedup": (sum(r["tokens"] for r in together) / spent["together"]["cpu_s"])
        / (tokens / spent["alone"]["cpu_s"]),
        # forward passes and rows stepped in each phase (all rounds): the rows stepped are the same, the
        # passes fewer when the rows share them
        "sequential_forward_passes": int(spent["alone"]["forward_passes"]),
        "concurrent_forward_passes": int(spent["together"]["forward_passes"]),
        "sequential_rows_stepped": int(spent["alone"]["rows"]),
        "concurrent_rows_stepped": int(spent["together"]["rows"]),
    }
    if args.library:
        ceiling = library_ceiling(args.model, texts, args.max_tokens, settings, args.threads)
        report["library_speedup"] = ceiling["library_speedup"]
        report["library_cpu_speedup"] = ceiling["library_cpu_speedup"]
        report["library_identical"] = ceiling["library_texts"] == [r["text"] for r in rounds[0][0]]
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.model}: {args.clients} streaming clients, {args.max_tokens} tokens each, {args.rounds} rounds")
    print(
        f"  one at a time : {report['sequential_tokens_per_s']:8.1f} tokens/s   p50 {report['sequential_p50_s']:.2f} s"
    )
    print(
        f"  all at once   : {report['concurrent_tokens_per_s']:8.1f} tokens/s   p50 {report['p50_s']:.2f} s, "
        f"p95 {report['p95_s']:.2f} s, first token p50 {report['first_token_p50_s']:.2f} s"
    )
    print(
        f"  speedup {report['speedup']:.2f}x (in server CPU time {report['cpu_speedup']:.2f}x), "
        f"identical outputs: {identical}"
    )
    print(
        f"  forward passes: {report['sequential_forward_passes']} one at a time, "
        f"{report['concurrent_forward_passes']} all at once (rows stepped: {report['sequential_rows_stepped']}, "
        f"{report['concurrent_rows_stepped']})"
    )
    if args.library:
        print(
            f"  library, one batch vs one at a time: {report['library_speedup']:.2f}x "
            f"(CPU {report['library_cpu_speedup']:.2f}x), same texts as the server: {report['library_identical']}"
        )


if __name__ == "__main__":
    main()
