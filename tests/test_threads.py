"""Thread defaults: the idle CPUs, a short spin before waiting threads sleep, and the user's own settings respected."""

import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffutron import threads


def test_threads_follow_the_idle_cpus(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    for idle, expected in [(7.6, 8), (2.4, 2), (0.2, 1), (None, 8)]:
        monkeypatch.setattr(threads, "idle_cpus", lambda idle=idle: idle)
        assert threads.choose_threads() == expected


def test_configure_spins_briefly_and_keeps_the_users_settings(monkeypatch):
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.setenv(name, "x")  # recorded, so that the test leaves the environment as it found it
        monkeypatch.delenv(name)
    monkeypatch.setenv("KMP_BLOCKTIME", "5")
    monkeypatch.setattr(threads, "choose_threads", lambda: 2)
    assert threads.configure() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["GOMP_SPINCOUNT"] == "1000"
    assert os.environ["KMP_BLOCKTIME"] == "5" and "OMP_WAIT_POLICY" not in os.environ
    assert threads.configure() is None  # OMP_NUM_THREADS is set now: it stands


def _proc_stat(monkeypatch, *first_lines: str) -> list[float]:
    """idle_cpus over /proc/stat files whose first lines are given, one per reading; the sleeps asked for."""
    readings = iter(first_lines)
    slept = []
    monkeypatch.setattr(threads, "open", lambda path: io.StringIO(next(readings) + "\ncpu0 ...\n"), raising=False)
    monkeypatch.setattr(threads.time, "sleep", slept.append)
    return slept


def test_idle_cpus_is_the_idle_share_of_the_window_times_the_cpus(monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    # fields: user nice system idle iowait irq softirq steal ...; idle time = idle + iowait
    slept = _proc_stat(monkeypatch, "cpu  100 0 100 700 100 0 0 0 0 0", "cpu  300 0 200 850 150 0 0 0 0 0")
    assert threads.idle_cpus(window_s=0.25) == pytest.approx((150 + 50) / 500 * 4)  # 1.6 of 4 CPUs idle
    assert slept == [0.25]
    _proc_stat(monkeypatch, "cpu  0 0 0 0 0 0 0 0 0 0", "cpu  400 0 0 0 0 0 0 0 0 0")
    assert threads.idle_cpus() == 0.0  # all busy
    _proc_stat(monkeypatch, "cpu  0 0 0 0 0 0 0 0 0 0", "cpu  0 0 0 300 100 0 0 0 0 0")
    assert threads.idle_cpus() == 4.0  # all idle
    _proc_stat(monkeypatch, "cpu  5 0 0 5 0", "cpu  5 0 0 5 0")
    assert threads.idle_cpus() is None  # no time passed: no reading
    _proc_stat(monkeypatch, "intr 1 2 3", "intr 1 2 3")
    assert threads.idle_cpus() is None  # not the format it knows


def test_idle_cpus_reads_the_real_proc_stat():
    if not os.path.exists("/proc/stat"):
        assert threads.idle_cpus(window_s=0.02) is None
        return
    idle = threads.idle_cpus(window_s=0.05)
    assert isinstance(idle, float) and 0 <= idle <= os.cpu_count()


def _torch_threads(env: dict, *args) -> str:
    code = (
        "import sys; from diffutron.cli import main; main(sys.argv[1:]); import torch; print(torch.get_num_threads())"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "info", "preset:tiny", "--json"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def _plain_torch_threads(env: dict) -> str:
    code = "import torch; print(torch.get_num_threads())"
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True).stdout


def test_the_cli_sets_threads_before_torch_starts():
    with ThreadPoolExecutor(max_workers=4) as pool:  # four fresh interpreters, side by side
        flag_1 = pool.submit(_torch_threads, {}, "--threads", "1")
        env_1 = pool.submit(_torch_threads, {"OMP_NUM_THREADS": "1"})
        flag_3 = pool.submit(_torch_threads, {}, "--threads", "3")
        plain_3 = pool.submit(_plain_torch_threads, {"OMP_NUM_THREADS": "3"})
    # 1: not torch's default on a machine of 2 or more cores (a count equal to the default proves nothing)
    assert flag_1.result() == "1"
    assert env_1.result() == "1"  # the user's own setting stands
    # 3: what torch makes of OMP_NUM_THREADS=3 set before it starts (torch 2.13 caps it at the machine's
    # CPUs: 2 on a 2-core machine)
    assert flag_3.result() == plain_3.result().strip()
