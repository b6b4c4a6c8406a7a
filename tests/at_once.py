"""Requests sent to a server at the same moment, one client and thread each: for tests of batching."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx


def at_once(url: str, bodies: list, send: Callable[[httpx.Client, object], object]) -> list:
    """`send(client, body)` for every body, all released together by a barrier; the results in order."""
    results: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as own:
            start.wait()
            results[i] = send(own, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results
