"""The precision of inference (precision.py): the names, the rule of `auto` on either side of each of its
branches (capability and timing injected, never assumed of the machine), its quick check (cached, bounded),
`--dtype` on every inference command with the dtype named in --json and /health, and bf16 where batching
meets rounding: a padded row within tolerance of itself alone, rows of one width joining a cached batch and
sharing the server's steps as they would alone."""

from __future__ import annotations

import platform
from pathlib import Path

import httpx
import pytest
import torch
from at_once import at_once
from cli_run import last_json, run
from precisions import TOLERANCE

from diffutron import precision
from diffutron.errors import UsageError
from diffutron.model import DiffusionLM
from diffutron.precision import auto_dtype, name_of, parse, resolve
from diffutron.sampling import Denoiser, SamplingConfig, generate, generation_canvas

CPU = torch.device("cpu")
PROMPTS = ["Bugün hava", "Türkiye Büyük Millet Meclisi 1920 yılında", "Ey Türk gençliği! Birinci vazifen"]
ONE_WIDTH = ["Bugün hava", "Bu sabah", "Dün akşam"]  # two tokens each: their canvases need no padding


@pytest.fixture(scope="module")
def bf16_lm():
    return DiffusionLM.from_pretrained("tiny-diffutron", device="cpu", dtype="bf16")


# -- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, expected",
    [
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.float32", torch.float32),
        ("float16", torch.float16),
        ("auto", "auto"),
        (None, None),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_parse(given, expected):
    assert parse(given) == expected


def test_an_unknown_dtype_is_one_line():
    with pytest.raises(UsageError, match=r"^unknown dtype 'int8': choose auto, fp32, bf16$"):
        parse("int8")
    with pytest.raises(UsageError, match="unknown dtype"):
        DiffusionLM.from_pretrained("tiny-diffutron", dtype="half-ish")


def test_names_of_dtypes():
    assert [name_of(d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)] == [
        "fp32",
        "bf16",
        "fp16",
        "float64",
    ]


# -- the rule of auto ----------------------------------------------------------------------------------
def _never() -> bool:
    raise AssertionError("asked, though the rule had decided")


@pytest.mark.parametrize(
    "device, has_bf16, faster, expected",
    [
        ("cuda", _never, _never, torch.bfloat16),  # as before: bf16 on CUDA, nothing timed
        ("cpu", lambda: False, _never, torch.float32),  # no bf16 matrix instructions: no timing either
        ("cpu", lambda: True, lambda: True, torch.bfloat16),
        ("cpu", lambda: True, lambda: False, torch.float32),  # the instructions, but the check finds it slower
        ("mps", _never, _never, torch.float32),
    ],
)
def test_the_auto_rule(device, has_bf16, faster, expected):
    assert auto_dtype(torch.device(device), has_bf16, faster) == expected


def test_the_default_without_auto_is_unchanged(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", _never)
    assert resolve(None, CPU) == torch.float32 and resolve(None, torch.device("cuda")) == torch.bfloat16
    assert resolve("bf16", CPU) == torch.bfloat16 and resolve(torch.float32, torch.device("cuda")) == torch.float32


def test_auto_on_this_cpu_follows_its_instructions(monkeypatch):
    """fp32 on a CPU without bf16 matrix instructions (the AVX2 EPYC these tests were written on), without
    timing anything; where it has them, the timing decides."""
    timed = []
    monkeypatch.setattr(precision, "bf16_speedup", lambda *shape: timed.append(shape) or 2.0)
    chosen = resolve("auto", CPU)
    if precision.cpu_has_bf16_matmul():
        assert chosen == torch.bfloat16 and len(timed) == 1
    else:
        assert chosen == torch.float32 and timed == []


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 /proc/cpuinfo"
)
def test_the_instructions_are_those_the_kernel_reports():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert precision.cpu_has_bf16_matmul() == bool(flags & {"avx512_bf16", "amx_tile"})


@pytest.mark.parametrize("speedup, expected", [(2.0, torch.bfloat16), (1.0, torch.float32)])
def test_from_pretrained_auto_times_the_widest_encoder_linear(monkeypatch, speedup, expected):
    shapes = []
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
    monkeypatch.setattr(precision, "bf16_speedup", lambda *shape: shapes.append(shape) or speedup)
    lm = DiffusionLM.from_pretrained("tiny-diffutron", device="cpu", dtype="auto")
    assert lm.dtype == expected
    mlp_in = lm.hf_model.model.layers[0].mlp.Wi  # ModernBERT's widest: the MLP's input (the decoder is left out)
    assert shapes == [(mlp_in.in_features, mlp_in.out_features)]


def test_the_check_is_kept_per_process_and_bounded(monkeypatch):
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or linear(*a))
    precision._bf16_speedup.cache_clear()
    # every round within the budget: a busy machine can pass the default 0.5 s and stop early (tested below)
    monkeypatch.setattr(precision, "PROBE_BUDGET_S", 60.0)
    first = precision.bf16_speedup(256, 768)  # tiny-diffutron's MLP
    assert first > 0
    assert len(calls) == 2 + 2 * precision.PROBE_ROUNDS * precision.PROBE_CALLS  # a warm-up each, then the rounds
    timed = len(calls)
    assert precision.bf16_speedup(256, 768) == first and len(calls) == timed  # kept: nothing timed again
    monkeypatch.setattr(precision, "PROBE_BUDGET_S", 0.0)  # past its budget it stops after the round it is in
    calls.clear()
    precision.bf16_speedup(768, 2304)
    assert len(calls) == 2 + 2 * precision.PROBE_CALLS
    precision._bf16_speedup.cache_clear()


# -- --dtype on the commands, named in --json and /health -------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "Bugün hava", "-n", "4", "--steps", "2", "--ignore-eos"],
        ["infill", "Ankara <mask> başkentidir."],
        ["fill-mask", "Ankara <mask> başkentidir."],
    ],
)
def test_dtype_option_and_json(capsys, argv):
    code, out, _ = run(capsys, *argv, "--dtype", "bf16", "--json")
    assert code == 0 and last_json(out)["dtype"] == "bf16"
    code, out, _ = run(capsys, *argv, "--json")  # auto
    assert code == 0 and last_json(out)["dtype"] == name_of(resolve("auto", CPU))


def test_eval_in_bf16_is_within_a_percent_of_fp32(capsys, tmp_path):
    import itertools

    from diffutron.data import read_documents

    data = tmp_path / "heldout.txt"
    documents = itertools.islice(read_documents("bundled:heldout"), 12)
    data.write_text("\n\n".join(d.text for d in documents), encoding="utf-8")
    ppl = {}
    for dtype in ("fp32", "bf16"):
        code, out, _ = run(capsys, "eval", "--data", str(data), "--elbo-samples", "0", "--dtype", dtype, "--json")
        assert code == 0 and last_json(out)["dtype"] == dtype
        ppl[dtype] = last_json(out)["ppl"]
    assert abs(ppl["bf16"] / ppl["fp32"] - 1) < 0.01  # the same masks; the benchmark measures the whole split


def test_a_bad_dtype_is_a_usage_error(capsys):
    code, out, err = run(capsys, "fill-mask", "Ankara <mask>", "--dtype", "int8")
    assert code == 2 and out == "" and err.strip() == "error: unknown --dtype 'int8': choose auto, fp32, bf16"


def test_the_harness_model_takes_a_dtype():
    pytest.importorskip("lm_eval")
    from diffutron.harness import HarnessModel

    model = HarnessModel(pretrained="tiny-diffutron", dtype="bf16")
    assert model.lm.dtype == torch.bfloat16 and model.get_model_info()["dtype"] == "bf16"
    with pytest.raises(UsageError, match="unknown dtype"):
        HarnessModel(pretrained="tiny-diffutron", dtype="int8")


def test_lm_evals_model_args_cannot_override_its_dtype(capsys):
    """`diffutron lm-eval` loads the model from MODEL, --device and --dtype: the same in --model-args would be
    ignored (the model is loaded already), so they are refused, not silently dropped."""
    pytest.importorskip("lm_eval")
    code, out, err = run(capsys, "lm-eval", "--tasks", "tr_cloze", "--limit", "1", "--model-args", "dtype=bf16")
    assert code == 2 and out == ""
    assert err.strip() == "error: --model-args dtype: set it with the command's own MODEL, --device, --dtype"


def test_health_names_the_dtype_and_the_server_batches_in_bf16(bf16_lm):
    """Requests of one width (no padding) stepped together in bf16 get what each gets alone, in fewer passes."""
    from diffutron.serve import create_app, serving

    bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0.8, "seed": 3} for p in ONE_WIDTH]
    with serving(create_app(bf16_lm)) as url, httpx.Client(base_url=url, timeout=120) as client:
        assert client.get("/health").json()["dtype"] == "bf16"
        alone = [client.post("/v1/completions", json=body).json() for body in bodies]
        before = client.get("/health").json()
        together = at_once(url, bodies, lambda own, body: own.post("/v1/completions", json=body).json())
        after = client.get("/health").json()
    assert [r["choices"][0]["text"] for r in together] == [r["choices"][0]["text"] for r in alone]
    assert after["forward_passes"] - before["forward_passes"] < sum(r["usage"]["forward_passes"] for r in alone)


# -- bf16 where batching meets rounding -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_row_is_itself_alone_within_the_tolerance(dtype):
    """A row padded to its batch's width: the same hidden states as alone, up to the attention kernel's
    rounding (tests/precisions.py: fp32's, or 1/16 + 2**-6 relative in bf16; measured 0.055 of values up to 4)."""
    lm = DiffusionLM.from_preset("tiny", seed=0, initializer_range=0.2).to(dtype).eval()
    batch = generation_canvas(lm, PROMPTS, 16)
    with torch.no_grad():
        together = lm.encode(batch.ids, batch.attention_mask)
        for row, prompt in enumerate(PROMPTS):
            alone = generation_canvas(lm, [prompt], 16)
            hidden = lm.encode(alone.ids, alone.attention_mask)[0]
            torch.testing.assert_close(together[row][batch.attention_mask[row].bool()], hidden, **TOLERANCE[dtype])


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_bf16_rows_of_one_width_joining_a_batch_get_what_they_get_alone(bf16_lm, cache):
    """The cache's rows follow their rows in bf16 too: a row joining mid-block and the rows already there
    (all of one width, so no padding changes their rounding) each write what they write alone."""
    config = SamplingConfig(block_length=4, stop_at_eos=False, cache=cache)
    alone = {p: generate(bf16_lm, [p], max_new_tokens=12, config=config).token_ids[0] for p in ONE_WIDTH}
    denoiser = Denoiser(bf16_lm, config)
    denoiser.add(generation_canvas(bf16_lm, ONE_WIDTH[:2], 12), config, keys=ONE_WIDTH[:2])
    together = {}
    for _ in range(2):
        together.update((f.key, f.token_ids) for f in denoiser.step().finished if f)
    denoiser.add(generation_canvas(bf16_lm, ONE_WIDTH[2:], 12), config, keys=ONE_WIDTH[2:])
    while len(denoiser):
        together.update((f.key, f.token_ids) for f in denoiser.step().finished if f)
    assert together == alone
