"""`diffutron serve`: the OpenAI-compatible HTTP server with its web page (the `serve` extra)."""

from __future__ import annotations

import logging

import typer

from diffutron.cli.common import DeviceOpt, DtypeOpt, ModelArg, app, dtype_name, err, load_model
from diffutron.errors import DiffutronError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command("serve")
def serve(
    model: str | None = ModelArg,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="0: any free port"),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="DIFFUTRON_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"
    ),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="rows denoised together at most (all requests)"),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="requests waiting at most; more get HTTP 429"),
    allowed_hosts: str | None = typer.Option(
        None,
        "--allowed-hosts",
        help="Host names to answer besides localhost, 127.0.0.1, [::1] (comma-separated; '*.example.com' for its "
        "subdomains, '*' for any) [default: only those on a loopback --host, any elsewhere]",
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="the model's id in the API [default: its name; a local folder's own name]"
    ),
    device: str | None = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Serve MODEL over HTTP: OpenAI-compatible completions and chat with the denoising streamed,
    infill, fill-mask and likelihood scoring, concurrent requests batched step by step; a web page at /."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DiffutronError("diffutron serve needs the serve extra: pip install 'diffutron[serve]'") from None
    from diffutron.serve import bind, create_app, run
    from diffutron.serve.app import trusted_hosts
    from diffutron.serve.server import url

    extra_hosts = [name.strip().lower() for name in (allowed_hosts or "").split(",") if name.strip()]
    sock = bind(host, port)  # before the model loads: a port in use fails at once
    hosts = trusted_hosts(sock.getsockname()[0], extra_hosts)
    lm = load_model(model, device, dtype)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    served = logging.getLogger("diffutron.serve")
    served.addHandler(handler)
    served.setLevel(logging.INFO)
    if host not in LOOPBACK and api_key is None:
        err.print(
            f"[yellow]warning: listening on {host} without --api-key: anyone who can reach it can use it[/]",
            soft_wrap=True,
        )
    err.print(
        f"serving {lm.name} ({dtype_name(lm)}) at {url(sock)}  (web page at /, OpenAI API at /v1; Ctrl-C stops)",
        soft_wrap=True,
    )
    app = create_app(
        lm,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        allowed_hosts=hosts,
        model_name=served_model_name,
    )
    run(app, sock)
