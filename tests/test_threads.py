"""Thread defaults: the idle CPUs, a short spin before waiting threads sleep, and the user's own settings respected."""

import os
import subprocess
import sys

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


def test_idle_cpus_reads_proc_stat():
    idle = threads.idle_cpus(window_s=0.02)
    assert idle is None or 0 <= idle <= os.cpu_count()


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


def test_the_cli_sets_threads_before_torch_starts():
    assert _torch_threads({}, "--threads", "2") == "2"
    assert _torch_threads({"OMP_NUM_THREADS": "1"}) == "1"  # the user's own setting stands
