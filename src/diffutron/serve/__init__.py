"""`diffutron serve`: an OpenAI-compatible HTTP server that streams the denoising and batches concurrent
requests step by step, with a web page at `/`. Needs the `serve` extra (FastAPI, uvicorn)."""

from diffutron.serve.app import create_app
from diffutron.serve.server import bind, run, serving

__all__ = ["bind", "create_app", "run", "serving"]
