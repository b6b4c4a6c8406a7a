"""CPU threads on a shared machine: torch's defaults against diffutron's, quiet and beside a busy process.

    python benchmarks/threads.py [--json] [--repeats 3] [--busy 1] [--settings "torch default,diffutron"]
        [--workloads generate,eval]

Each workload runs as a fresh `diffutron` process (the thread pool is set when torch starts) and
reports its own compute time: `generate` (the shipped tiny model, 64 tokens, the sampler's seconds)
and `eval` (PPL@15% on 16 held-out documents, its seconds). Settings, by environment:
  torch default   OMP_NUM_THREADS = all CPUs, OpenMP's default wait policy (spin, then sleep): before
  passive wait    the same threads, OMP_WAIT_POLICY=PASSIVE (waiting threads sleep at once)
  short spin      the same threads, GOMP_SPINCOUNT=1000 (spin briefly, then sleep)
  one thread      OMP_NUM_THREADS=1
  diffutron       nothing set: diffutron chooses (src/diffutron/threads.py)
Scenarios: quiet, and with `--busy` processes spinning on the CPU (what another user's job does).
Medians of `--repeats` runs; the slowdown is busy / quiet per setting. With --json, stdout is one object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "torch default": {"OMP_NUM_THREADS": str(os.cpu_count())},
    "passive wait": {"OMP_NUM_THREADS": str(os.cpu_count()), "OMP_WAIT_POLICY": "PASSIVE"},
    "short spin": {"OMP_NUM_THREADS": str(os.cpu_count()), "GOMP_SPINCOUNT": "1000"},
    "one thread": {"OMP_NUM_THREADS": "1"},
    "diffutron": {},
}


WORKLOADS = ("generate", "eval")


def workloads(data: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "diffutron"]
    return {
        "generate": cli + ["generate", "Türkiye Cumhuriyeti", "-n", "64", "--no-live", "--json"],
        "eval": cli + ["eval", "--data", data, "--samples", "1", "--elbo-samples", "0", "--json"],
    }


def seconds(command: list[str], env: dict) -> float:
    settings = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    clean = {k: v for k, v in os.environ.items() if k not in settings}
    done = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=1, help="spinning processes in the busy scenario")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="a comma-separated subset of the settings")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="a comma-separated subset of the workloads")
    args = parser.parse_args()
    if unknown := set(args.workloads.split(",")) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(unknown)}: choose from {', '.join(WORKLOADS)}")
    if unknown := set(args.settings.split(",")) - SETTINGS.keys():
        parser.error(f"unknown settings {sorted(unknown)}: choose from {', '.join(SETTINGS)}")
    say = lambda line: print(line, file=sys.stderr if args.json else sys.stdout)  # noqa: E731

    from diffutron.data import bundled_documents

    chosen = {name: SETTINGS[name] for name in args.settings.split(",")}
    compared = {"torch default", "diffutron"} <= chosen.keys()  # the ratios need both

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "heldout16.txt"
        documents = itertools.islice(bundled_documents("heldout"), 16)
        data.write_text("\n\n".join(d.text for d in documents), encoding="utf-8")
        results: dict = {}
        commands, chosen_workloads = workloads(str(data)), args.workloads.split(",")
        for scenario in ("quiet", "busy"):
            spinners = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy if scenario == "busy" else 0)
            ]
            try:
                for name in chosen_workloads:
                    command = commands[name]
                    for setting, env in chosen.items():
                        times = [seconds(command, env) for _ in range(args.repeats)]
                        results.setdefault(name, {}).setdefault(setting, {})[scenario] = statistics.median(times)
                        say(f"{scenario:<6} {name:<9} {setting:<14} {statistics.median(times):7.2f} s")
            finally:
                for p in spinners:
                    p.kill()
    for per_setting in results.values():
        for timing in per_setting.values():
            timing["slowdown"] = timing["busy"] / timing["quiet"]
    summary = {
        "cpus": os.cpu_count(),
        "busy_processes": args.busy,
        "repeats": args.repeats,
        "results": results,
    }
    if compared:
        summary["busy_speedup_vs_torch_default"] = {
            name: r["torch default"]["busy"] / r["diffutron"]["busy"] for name, r in results.items()
        }
        summary["quiet_ratio_vs_torch_default"] = {
            name: r["torch default"]["quiet"] / r["diffutron"]["quiet"] for name, r in results.items()
        }
    for name in results if compared else ():
        say(
            f"{name}: busy, diffutron {summary['busy_speedup_vs_torch_default'][name]:.1f}x faster than torch's "
            f"default; quiet, {summary['quiet_ratio_vs_torch_default'][name]:.2f}x"
        )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
