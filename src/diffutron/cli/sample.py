"""`diffutron generate` and `infill`: discrete diffusion sampling with a live view of the denoising.

Settings left out take the defaults of `diffutron.sampling.user_config`, the one mapping from a
user's settings to a SamplingConfig that the server shares. Results on a pipe or in a file are the
exact text; a terminal shows the prompt dimmed before its continuation.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer
from rich.text import Text

from diffutron.cli.common import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    app,
    dtype_name,
    err,
    load_model,
    out,
    print_json,
)
from diffutron.errors import UsageError
from diffutron.sampling.config import CACHES, FRAMES, MAX_NEW_TOKENS, POLICIES, USER_DEFAULTS, SamplingConfig


def _default(mode: str, name: str):
    return USER_DEFAULTS[mode].get(name, getattr(SamplingConfig, name))


def _options(mode: str) -> dict:
    """The sampling options of a verb; None = user_config's default, shown in the help."""
    d = lambda name: f"[default: {_default(mode, name)}]"  # noqa: E731
    return dict(
        steps=typer.Option(None, "--steps", min=1, help="denoising steps [default: one token per step]"),
        policy=typer.Option(None, "--policy", help=f"{', '.join(POLICIES)} {d('policy')}"),
        temperature=typer.Option(None, "--temperature", help=f"0 is greedy {d('temperature')}"),
        top_k=typer.Option(None, "--top-k", help=f"0 is off {d('top_k')}"),
        top_p=typer.Option(None, "--top-p", help=f"1 is off {d('top_p')}"),
        repetition_penalty=typer.Option(
            None,
            "--repetition-penalty",
            help=f"CTRL's, on prompt and generated tokens; 1 is off {d('repetition_penalty')}",
        ),
        threshold=typer.Option(None, "--threshold", help=f"confidence tau of the threshold policy {d('threshold')}"),
        cfg_scale=typer.Option(None, "--cfg", help=f"classifier-free guidance scale, 0 is off {d('cfg_scale')}"),
        schedule=typer.Option(None, "--schedule", help=f"tokens revealed per step: linear, cosine {d('schedule')}"),
        cache=typer.Option(None, "--cache", help=f"{', '.join(CACHES)}: approximate key/value caching {d('cache')}"),
        refresh_every=typer.Option(
            None, "--refresh-every", min=1, help="steps between full refreshes of the cache [default: each block]"
        ),
        seed=typer.Option(None, "--seed", help=f"row i draws with seed + i {d('seed')}"),
    )


GENERATE, INFILL = _options("generate"), _options("infill")
LiveOpt = typer.Option(None, "--live/--no-live", help="show the denoising step by step [default: on a terminal]")
SETTINGS = tuple(GENERATE)


def _settings(options: dict, **extra) -> dict:
    return {**{k: options[k] for k in SETTINGS if k in options}, **extra}


def _live_view(lm, row: int = 0):
    """A callback that shows one row of the canvas resolving, masks as ░, on stderr."""
    from rich.live import Live

    live = Live(console=err, refresh_per_second=12, transient=False)

    def render(state) -> None:
        pieces, run = [], []
        for token in state.ids[row].tolist():
            if token == lm.mask_id:
                pieces += [lm.tokenizer.decode(run, skip_special_tokens=True), "░"]
                run = []
            else:
                run.append(token)
        pieces.append(lm.tokenizer.decode(run, skip_special_tokens=True))
        live.update(Text(f"step {state.step}: ", style="dim") + Text("".join(pieces)))

    return live, render


def _sample(model: str | None, device: str | None, dtype: str, live: bool | None, as_json: bool, run):
    """Load the model, then run(lm, callback) with a live view of row 0 when wanted."""
    lm = load_model(model, device, dtype)
    if live is None:
        live = err.is_terminal and not as_json
    if not live:
        return lm, run(lm, None)
    view, render = _live_view(lm)
    with view:
        return lm, run(lm, render)


def _write_texts(texts: list[str], prompts: list[str] | None, full: bool) -> None:
    """Exact text on a pipe or in a file (several results separated by a blank line); on a terminal the
    prompt is shown dimmed before its continuation."""
    if not out.is_terminal:
        pieces = [(p + t if full and prompts else t) for p, t in zip(prompts or texts, texts, strict=True)]
        sys.stdout.write("\n\n".join(pieces) + "\n")
        sys.stdout.flush()
        return
    for i, text in enumerate(texts):
        shown = Text(prompts[i], style="" if full else "dim") if prompts else Text()
        out.print(shown + Text(text), highlight=False)
        if i < len(texts) - 1:
            out.print()


def _summary(result) -> None:
    finished = ", ".join(sorted(set(result.finished_by)))
    err.print(
        f"[dim]{result.new_tokens} tokens, {result.forward_passes} forward passes, {result.seconds:.1f} s "
        f"({result.tokens_per_s:.1f} tokens/s), finished by {finished}[/]"
    )


# English function words that Turkish text does not use: an English prompt gets a note.
_ENGLISH = re.compile(r"\b(the|and|of|is|are|was|what|how|why|who|this|that|with|you|your)\b", re.IGNORECASE)


def _note_if_english(model: str | None, prompts: list[str]) -> None:
    shipped = model is None or Path(model).name in ("tiny-diffutron", "tiny-base")
    if shipped and any(len(_ENGLISH.findall(p)) >= 1 and not re.search(r"[çğıöşüÇĞİÖŞÜ]", p) for p in prompts):
        err.print(
            f"[yellow]note: {model or DEFAULT_MODEL} is a Turkish model: an English prompt gets Turkish-looking text[/]"
        )


def _prompts(args: list[str], prompt: list[str], prompts_file: str | None) -> tuple[str | None, list[str]]:
    """(MODEL, prompts) from `[MODEL] [PROMPT]`, --prompt (repeatable) and --prompts-file (one per line)."""
    extra = list(prompt)
    if prompts_file:
        try:
            extra += [line for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompts-file {prompts_file}: {e}") from None
    if len(args) > 2 or (extra and len(args) > 1):
        raise UsageError("generate takes [MODEL] PROMPT (quote the prompt), or [MODEL] with --prompt / --prompts-file")
    if extra:
        return (args[0] if args else None), extra
    if not args:
        raise UsageError('give a PROMPT ("" for unconditional), --prompt or --prompts-file')
    return (None, args) if len(args) == 1 else (args[0], args[1:])


@app.command("generate")
def generate_(
    args: list[str] = typer.Argument(None, metavar="[MODEL] [PROMPT]", help='PROMPT, "" for unconditional'),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="a prompt (repeatable); batched together"),
    prompts_file: str | None = typer.Option(None, "--prompts-file", help="a text file of prompts, one per line"),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="continuations per prompt (seeds seed + i)"),
    max_new_tokens: int = typer.Option(MAX_NEW_TOKENS, "--max-new-tokens", "-n", min=1),
    block_length: int | None = typer.Option(None, "--block-length", min=1, help="semi-autoregressive block size"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable): the text ends before it"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="do not stop at the end-of-sequence token"),
    ban_eos: bool = typer.Option(False, "--ban-eos", help="never emit the end-of-sequence token: full length"),
    frame: str | None = typer.Option(
        None, "--frame", help=f"canvas: {', '.join(FRAMES)} [default: {_default('generate', 'frame')}]"
    ),
    truncate_prompt: bool = typer.Option(False, "--truncate-prompt", help="left-truncate a prompt that does not fit"),
    full: bool = typer.Option(False, "--full", help="print the prompt and its continuation, not the continuation only"),
    steps: int | None = GENERATE["steps"],
    policy: str | None = GENERATE["policy"],
    temperature: float | None = GENERATE["temperature"],
    top_k: int | None = GENERATE["top_k"],
    top_p: float | None = GENERATE["top_p"],
    repetition_penalty: float | None = GENERATE["repetition_penalty"],
    threshold: float | None = GENERATE["threshold"],
    cfg_scale: float | None = GENERATE["cfg_scale"],
    schedule: str | None = GENERATE["schedule"],
    cache: str | None = GENERATE["cache"],
    refresh_every: int | None = GENERATE["refresh_every"],
    seed: int | None = GENERATE["seed"],
    live: bool | None = LiveOpt,
    device: str | None = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Continue PROMPT(s) by discrete diffusion: start from masks, reveal tokens step by step."""
    from diffutron.sampling import generate, user_config

    model, prompts = _prompts(args or [], prompt, prompts_file)
    config = user_config(
        "generate",
        **_settings(locals()),
        block_length=block_length,
        stop=tuple(stop),
        stop_at_eos=not ignore_eos,
        ban_eos=ban_eos,
        frame=frame,
        truncate_prompt=truncate_prompt,
    )
    rows = [p for p in prompts for _ in range(num_samples)]
    if not as_json:
        _note_if_english(model, prompts)
    lm, result = _sample(
        model,
        device,
        dtype,
        live,
        as_json,
        lambda lm, callback: generate(lm, rows, max_new_tokens, config, callback=callback),
    )
    if as_json:
        results = [
            {"prompt": p, "sample": i % num_samples, "text": t, "tokens": ids, "finished_by": why, "forward_passes": n}
            for i, (p, t, ids, why, n) in enumerate(
                zip(rows, result.texts, result.token_ids, result.finished_by, result.row_passes, strict=True)
            )
        ]
        return print_json({"model": lm.name, "dtype": dtype_name(lm), "results": results, **_figures(result)})
    _write_texts(result.texts, rows, full)
    _summary(result)


def _figures(result) -> dict:
    return {
        "forward_passes": result.forward_passes,
        "steps": result.steps,
        "new_tokens": result.new_tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens_per_s,
    }


@app.command("infill")
def infill_(
    args: list[str] = typer.Argument(
        ..., metavar="[MODEL] TEXT", help="TEXT with <mask> (one token), <mask*N>, or one <mask*?> / <mask*A-B>"
    ),
    steps: int | None = INFILL["steps"],
    policy: str | None = INFILL["policy"],
    temperature: float | None = INFILL["temperature"],
    top_k: int | None = INFILL["top_k"],
    top_p: float | None = INFILL["top_p"],
    repetition_penalty: float | None = INFILL["repetition_penalty"],
    threshold: float | None = INFILL["threshold"],
    cfg_scale: float | None = INFILL["cfg_scale"],
    schedule: str | None = INFILL["schedule"],
    cache: str | None = INFILL["cache"],
    refresh_every: int | None = INFILL["refresh_every"],
    seed: int | None = INFILL["seed"],
    live: bool | None = LiveOpt,
    device: str | None = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Fill every <mask> of TEXT jointly, keeping every given token. A span of unknown length (<mask*?>:
    1 to 8 tokens, <mask*A-B>: A to B) is filled at each length and the best-scoring filling kept."""
    from diffutron.sampling import infill, user_config

    if len(args) > 2:
        raise UsageError("infill takes [MODEL] TEXT: quote the text")
    model, text = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    config = user_config("infill", **_settings(locals()))
    lm, result = _sample(
        model, device, dtype, live, as_json, lambda lm, callback: infill(lm, [text], config, callback=callback)
    )
    if as_json:
        row = {"text": result.texts[0], "tokens": result.token_ids[0], "finished_by": result.finished_by[0]}
        if result.lengths and result.lengths[0] is not None:
            row["lengths"] = result.lengths[0]  # every length tried, with its score
        return print_json({"model": lm.name, "dtype": dtype_name(lm), "input": text, **row, **_figures(result)})
    _write_texts(result.texts, None, full=False)
    _summary(result)
