"""Helpers shared by the benchmark scripts: peak memory, timing, one JSON line at the end."""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import time


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset_peak_rss() (Linux VmHWM)."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Forget the peak so far (e.g. model initialisation), so the next peak is the measured work's.

    Returns freed heap to the OS first, then resets VmHWM (Linux >= 4.0: clear_refs value 5).
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_worker(script: str, *args: str) -> dict:
    """Run `script --worker ...` in a fresh process (so its peak memory is its own); return its JSON."""
    done = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])
