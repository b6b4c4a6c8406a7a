"""`diffutron generate` and `infill`: discrete diffusion sampling with a live view of the denoising."""

from __future__ import annotations

import typer
from rich.text import Text

from diffutron.cli.common import (
    DeviceOpt,
    JsonOpt,
    app,
    err,
    load_model,
    model_and_text,
    out,
    print_json,
)

# Sampling options, shared by generate and infill.
StepsOpt = typer.Option(None, "--steps", min=1, help="denoising steps [default: one token per step]")
PolicyOpt = typer.Option("confidence", "--policy", help="confidence, margin, entropy, random, threshold, ancestral")
TemperatureOpt = typer.Option(0.0, "--temperature", help="0 is greedy")
TopKOpt = typer.Option(0, "--top-k", min=0, help="0 is off")
TopPOpt = typer.Option(1.0, "--top-p", help="1 is off")
PenaltyOpt = typer.Option(1.0, "--repetition-penalty", help="1 is off (the reference chat settings used 1.2)")
# generate's default: on the shipped model, greedy decoding with 1.2 repeats a token half as often,
# with more distinct bigrams and lower trigram perplexity (docs/benchmarks.md, sampling policies)
GeneratePenaltyOpt = typer.Option(
    1.2, "--repetition-penalty", help="CTRL's penalty on tokens already present; 1 is off"
)
ThresholdOpt = typer.Option(0.9, "--threshold", help="confidence tau of the threshold policy")
CfgOpt = typer.Option(0.0, "--cfg", help="classifier-free guidance scale, 0 is off")
SeedOpt = typer.Option(0, "--seed")
ScheduleOpt = typer.Option("linear", "--schedule", help="how many tokens each step reveals: linear, cosine")
LiveOpt = typer.Option(None, "--live/--no-live", help="show the denoising step by step [default: on a terminal]")


def _sampling_config(options: dict, **explicit):
    """A validated SamplingConfig from a command's options of the same names (plus explicit values)."""
    import dataclasses

    from diffutron.sampling import SamplingConfig

    names = {f.name for f in dataclasses.fields(SamplingConfig)}
    config = SamplingConfig(**{**{k: v for k, v in options.items() if k in names}, **explicit})
    config.validate()
    return config


def _live_view(lm, canvas_row: int = 0):
    """A callback that shows row `canvas_row` of the canvas resolving, masks as ░, on stderr."""
    from rich.live import Live

    live = Live(console=err, refresh_per_second=12, transient=False)

    def render(state) -> None:
        ids = state.ids[canvas_row].tolist()
        pieces, run = [], []
        for token in ids:
            if token == lm.mask_id:
                pieces.append(lm.tokenizer.decode(run, skip_special_tokens=True))
                pieces.append("░")
                run = []
            else:
                run.append(token)
        pieces.append(lm.tokenizer.decode(run, skip_special_tokens=True))
        live.update(Text(f"step {state.step}: ", style="dim") + Text("".join(pieces)))

    return live, render


def _print_generation(result, as_json: bool, extra: dict) -> None:
    if as_json:
        return print_json(
            {
                **extra,
                "text": result.texts[0],
                "tokens": result.token_ids[0],
                "forward_passes": result.forward_passes,
                "steps": result.steps,
                "finished_by": result.finished_by[0],
                "seconds": result.seconds,
                "tokens_per_s": result.tokens_per_s,
            }
        )
    out.print(result.texts[0], markup=False, highlight=False)
    err.print(
        f"[dim]{result.new_tokens} tokens, {result.forward_passes} forward passes, "
        f"{result.seconds:.1f} s ({result.tokens_per_s:.1f} tokens/s), finished by {result.finished_by[0]}[/]"
    )


def _sample(model: str | None, device: str | None, live: bool | None, as_json: bool, run):
    """Load the model, then run(lm, callback) with a live view of row 0 when wanted."""
    lm = load_model(model, device)
    if live is None:
        live = err.is_terminal and not as_json
    if not live:
        return lm, run(lm, None)
    view, render = _live_view(lm)
    with view:
        return lm, run(lm, render)


@app.command("generate")
def generate_(
    args: list[str] = typer.Argument(..., metavar="[MODEL] PROMPT", help='PROMPT, "" for unconditional'),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    steps: int | None = StepsOpt,
    block_length: int | None = typer.Option(None, "--block-length", min=1, help="semi-autoregressive block size"),
    policy: str = PolicyOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    repetition_penalty: float = GeneratePenaltyOpt,
    threshold: float = ThresholdOpt,
    cfg_scale: float = CfgOpt,
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable), matched on token ids"),
    no_eos: bool = typer.Option(False, "--no-eos", help="do not stop at the end-of-sequence token"),
    truncate_prompt: bool = typer.Option(False, "--truncate-prompt", help="left-truncate a prompt that does not fit"),
    schedule: str = ScheduleOpt,
    seed: int = SeedOpt,
    live: bool | None = LiveOpt,
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Continue PROMPT by discrete diffusion: start from masks, reveal tokens step by step."""
    from diffutron.sampling import generate

    model, prompt = model_and_text(args, "generate")
    config = _sampling_config(locals(), stop=tuple(stop), stop_at_eos=not no_eos)
    lm, result = _sample(
        model,
        device,
        live,
        as_json,
        lambda lm, callback: generate(lm, [prompt], max_new_tokens, config, callback=callback),
    )
    _print_generation(result, as_json, {"model": lm.name, "prompt": prompt})


@app.command("infill")
def infill_(
    args: list[str] = typer.Argument(..., metavar="[MODEL] TEXT", help="TEXT with <mask> (one token) or <mask*N>"),
    steps: int | None = StepsOpt,
    policy: str = PolicyOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    repetition_penalty: float = PenaltyOpt,
    threshold: float = ThresholdOpt,
    seed: int = SeedOpt,
    live: bool | None = LiveOpt,
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Fill every <mask> of TEXT jointly, keeping every given token."""
    from diffutron.sampling import infill

    model, text = model_and_text(args, "infill")
    config = _sampling_config(locals())
    lm, result = _sample(
        model, device, live, as_json, lambda lm, callback: infill(lm, [text], config, callback=callback)
    )
    _print_generation(result, as_json, {"model": lm.name, "input": text})
