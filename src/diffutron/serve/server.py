"""Running the app under uvicorn: in the foreground (`diffutron serve`) or in a background thread (tests,
benchmarks). The socket is bound before the model loads, so a port in use is a one-line error."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

from diffutron.errors import UsageError


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

    # our own line per request replaces uvicorn's access log
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def run(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until Ctrl-C / SIGTERM."""
    uvicorn_server(app, log_level).run(sockets=[sock])


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
