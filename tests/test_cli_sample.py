"""The `generate` and `infill` verbs: settings, output on a pipe, several prompts, errors."""

import pytest
from cli_run import last_json, run
from rows_alone import compute_rows_alone


def test_generate_json(capsys):
    code, out, _ = run(capsys, "generate", "Bugün hava", "-n", "8", "--steps", "4", "--ignore-eos", "--json")
    result = last_json(out)
    row = result["results"][0]
    assert code == 0 and len(row["tokens"]) == 8 and result["forward_passes"] == 4 == row["forward_passes"]
    assert row["text"] and row["finished_by"] == "length" and row["prompt"] == "Bugün hava"


def test_generate_with_model_and_policy(capsys):
    argv = ["generate", "preset:tiny", "", "-n", "8", "--policy", "threshold", "--temperature", "0.7", "--top-p", "0.9"]
    code, out, _ = run(capsys, *argv, "--no-live", "--json")
    assert code == 0 and last_json(out)["results"][0]["prompt"] == ""


def test_piped_output_is_the_exact_text(capsys):
    argv = ["generate", "Türkiye Cumhuriyeti", "-n", "96", "--ban-eos"]
    code, out, _ = run(capsys, *argv, "--json")
    text = last_json(out)["results"][0]["text"]
    assert code == 0 and len(text) > 80  # longer than a line: no hard wrapping on a pipe
    assert run(capsys, *argv)[1] == text + "\n"
    assert run(capsys, *argv, "--full")[1] == "Türkiye Cumhuriyeti" + text + "\n"


def test_several_prompts_and_samples_in_one_batch(capsys, tmp_path, monkeypatch):
    compute_rows_alone(monkeypatch)  # as the sampler guarantees; the batched encoder's rounding can tip a near tie
    settings = ["-n", "6", "--temperature", "1", "--ban-eos", "--seed", "3"]
    code, out, _ = run(capsys, "generate", "-p", "Bugün", "-p", "Ankara", "--num-samples", "2", *settings, "--json")
    results = last_json(out)["results"]
    assert code == 0 and [(r["prompt"], r["sample"]) for r in results] == [
        ("Bugün", 0),
        ("Bugün", 1),
        ("Ankara", 0),
        ("Ankara", 1),
    ]
    # row i draws with seed + i: the second sample of "Ankara" is the single run with seed 3 + 3
    alone = last_json(run(capsys, "generate", "Ankara", *settings[:-1], "6", "--json")[1])["results"][0]
    assert alone["text"] == results[3]["text"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Bugün\n\nAnkara\n", encoding="utf-8")
    code, out, _ = run(capsys, "generate", "--prompts-file", str(prompts), *settings, "--json")
    from_file = last_json(out)["results"]
    assert code == 0 and [r["prompt"] for r in from_file] == ["Bugün", "Ankara"]  # blank lines skipped
    assert from_file[0]["text"] == results[0]["text"]


def test_an_english_prompt_gets_a_note(capsys):
    _, _, err = run(capsys, "generate", "What is the capital of Turkey?", "-n", "4")
    assert "Turkish model" in err
    _, _, err = run(capsys, "generate", "Türkiye'nin başkenti", "-n", "4")
    assert "Turkish model" not in err


def test_infill_json_keeps_the_given_text(capsys):
    code, out, _ = run(capsys, "infill", "Ankara <mask*2> başkentidir.", "--json")
    result = last_json(out)
    assert code == 0 and result["text"].startswith("Ankara") and result["text"].endswith("başkentidir.")
    assert run(capsys, "infill", "Ankara <mask*2> başkentidir.")[1] == result["text"] + "\n"


def test_cached_decoding_from_the_command_line(capsys):
    """--cache with --refresh-every 1 is the exact sampler; with a block-long refresh it is its own run."""
    argv = ["generate", "Türkiye'nin başkenti", "-n", "16", "--block-length", "8", "--ban-eos", "--json"]
    exact = last_json(run(capsys, *argv)[1])["results"][0]
    refreshed = last_json(run(capsys, *argv, "--cache", "dual", "--refresh-every", "1")[1])["results"][0]
    cached = run(capsys, *argv, "--cache", "prefix")
    assert refreshed["tokens"] == exact["tokens"]
    assert cached[0] == 0 and len(last_json(cached[1])["results"][0]["tokens"]) == 16
    code, out, _ = run(capsys, "infill", "Ankara <mask*3> başkentidir.", "--cache", "dual", "--refresh-every", "1")
    assert code == 0 and out == run(capsys, "infill", "Ankara <mask*3> başkentidir.")[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "x", "--block-length", "5"], "block_length 5 must divide the generated length 64"),
        (["generate", "x", "--top-p", "2"], "top-p must be in (0, 1]"),
        (["generate", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "x", "--temperature", "nan"], "temperature must be a finite number"),
        (["generate", "x", "--temperature", "inf"], "temperature must be a finite number"),
        (["generate", "x", "--repetition-penalty", "nan"], "repetition-penalty must be a finite number"),
        (["generate", "x", "--cfg", "nan"], "cfg-scale must be a finite number"),
        (["generate", "x", "--seed", str(2**64)], "seed must be in"),
        (["generate", "x", "--policy", "ancestral", "--temperature", "0.5"], "ancestral policy is MDLM's sampler"),
        (["generate", "x", "-n", "600"], "max_new_tokens 600 does not fit the model's context of 512"),
        (["generate", "kelime " * 600, "-n", "16"], "exceed the model's context of 512"),
        (["generate"], "give a PROMPT"),
        (["generate", "m", "p", "-p", "q"], "generate takes [MODEL] PROMPT"),
        (["generate", "--prompts-file", "/nonexistent/prompts.txt"], "cannot read --prompts-file"),
        (["generate", "x", "--cache", "full"], "unknown cache 'full'"),
        (["generate", "x", "--refresh-every", "0"], "--refresh-every"),
        (["infill", "maskesiz"], "no <mask>"),
        (["infill", "a <mask>", "--temperature", "nan"], "temperature must be a finite number"),
    ],
)
def test_sampling_bad_input(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0]
