"""Running the app under uvicorn: in the foreground (`diffutron serve`) or in a background thread (tests,
benchmarks). The socket is bound before the model loads, so a port in use is a one-line error.

Stopping (SIGTERM, Ctrl-C, or the engine failing) is graceful and bounded: new requests get a 503, the
requests in flight have SHUTDOWN_GRACE_S seconds to finish, then every one left gets an OpenAI error
(a stream: an error event, then `[DONE]`), and only then does uvicorn close the connections (its own
`timeout_graceful_shutdown` is the backstop). A SIGTERM ends with exit 0, Ctrl-C with 130; an engine
failure ends `run` with a DiffutronError (exit 1), so a supervisor restarts the server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from contextlib import contextmanager

from diffutron.errors import DiffutronError, UsageError

log = logging.getLogger("diffutron.serve")

SHUTDOWN_GRACE_S = 5.0  # how long requests in flight may go on once the server is told to stop


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: any free port), or a UsageError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app, log_level: str = "info"):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose shutdown first lets the engine answer every request it holds."""

        async def shutdown(self, sockets=None) -> None:
            engine = app.state.engine
            engine.refuse()  # from now on a 503; the listening socket stays open until the answers are out
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            if not engine.idle:
                log.info("stopping: requests in flight have %.0f s to finish", SHUTDOWN_GRACE_S)
            while not (engine.idle or self.force_exit) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(engine.stop)  # what is left gets "the server is shutting down"
            await super().shutdown(sockets)

    # our own line per request replaces uvicorn's access log
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    return Server(config)


def run(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGTERM / Ctrl-C (KeyboardInterrupt), or until the engine fails (DiffutronError)."""
    server = uvicorn_server(app, log_level)
    engine = app.state.engine
    engine.on_failure = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it stopped on once it has stopped; a SIGTERM asked for a stop and got one
    sigterm = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    if engine.failure is not None:
        raise DiffutronError(f"the engine stopped: {type(engine.failure).__name__}: {engine.failure} (see the log)")


@contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve `app` from a background thread; yields its base URL, stops it on exit."""
    sock = bind(host, port)
    server = uvicorn_server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="diffutron-server", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.02)
        yield url(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
