"""How many CPU threads torch uses, chosen before torch is imported.

PyTorch starts one OpenMP thread per core and every operation waits for all of them. On a shared
machine a core taken by another process makes each such wait last a scheduler time slice, so a
model of small operations (the tiny models) slows down many times over; spinning threads also burn
the CPU the other process needs (benchmarks/threads.py measures it). diffutron therefore uses the
CPUs that are idle when it starts (measured over a short window, at least one) and lets waiting
threads spin only briefly before they sleep -- unless the user set OMP_NUM_THREADS or asked for a
number with `--threads`. Measured on 2 cores: sleeping at once (OMP_WAIT_POLICY=PASSIVE) made a quiet
`generate` about 1.2x slower than torch's default, a short spin about 1.1x, and both kept a busy
machine at well under half of the default's time (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys
import time

# Spin briefly, then sleep: GNU OpenMP (torch's on Linux) counts spins, LLVM/Intel OpenMP milliseconds.
SHORT_SPIN = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def idle_cpus(window_s: float = 0.05) -> float | None:
    """How many CPUs were idle over a short window, from /proc/stat; None where it cannot be read."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def choose_threads() -> int:
    cpus = available_cpus()
    idle = idle_cpus()
    return cpus if idle is None else max(1, min(cpus, round(idle)))


def configure(requested: int | None = None) -> int | None:
    """Set the thread count (and a short spin before waiting threads sleep) for torch; returns the count,
    or None when the user's own OMP_NUM_THREADS stands. Call before torch is imported; works after too."""
    if requested is None and "OMP_NUM_THREADS" in os.environ:
        return None
    threads = requested or choose_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    for name, value in SHORT_SPIN.items():
        os.environ.setdefault(name, value)
    if "torch" in sys.modules:  # imported already (an in-process call): the pool can still be resized
        import torch

        torch.set_num_threads(threads)
    return threads
