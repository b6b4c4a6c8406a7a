import subprocess
import sys

import pytest
from cli_run import last_json, run


def test_info_reports_the_reference_lora_share(capsys):
    code, out, _ = run(capsys, "info", "preset:mmbert-base", "--lora-r", "256", "--lora-alpha", "256", "--json")
    info = last_json(out)
    assert code == 0
    assert info["params_total"] == 307_786_240  # 307.8M, the base model
    assert info["params_trainable"] == 54_067_200 and info["trainable_percent"] == 14.94
    assert info["context_length"] == 512 and info["vocab_size"] == 256000


def test_info_all_linear_also_takes_the_head_dense(capsys):
    code, out, _ = run(
        capsys, "info", "preset:mmbert-base", "--lora-r", "256", "--lora-targets", "all-linear", "--json"
    )
    assert code == 0 and last_json(out)["trainable_percent"] == 15.03


def test_info_of_a_folder_without_lora(capsys, model_folders):
    code, out, _ = run(capsys, "info", model_folders["bert"], "--json")
    info = last_json(out)
    assert code == 0 and info["model_type"] == "bert" and info["mask_token"] == "[MASK]"
    assert info["params_trainable"] == info["params_total"]


def test_eval_json(capsys, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"metin": "Ankara Türkiye Cumhuriyeti\'nin başkentidir ve büyük bir şehirdir."}\n' * 6)
    code, out, _ = run(
        capsys,
        "eval",
        "preset:tiny",
        "--data",
        str(data),
        "--text-field",
        "metin",
        "--samples",
        "2",
        "--mask-ratio",
        "0.3",
        "--json",
    )
    result = last_json(out)
    assert code == 0
    assert {"ppl", "ppl_stderr", "elbo_ppl", "tokens", "top1"} <= result.keys()
    assert result["samples"] == 2 and result["tokens"] > 0


def test_eval_txt_and_default_model(capsys, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("Birinci belge burada.\nİkinci satırı da var.\n\nİkinci belge.\n")
    code, out, _ = run(capsys, "eval", "--data", str(data), "--elbo-samples", "0", "--json")
    result = last_json(out)
    assert code == 0 and result["model"].endswith("tiny-diffutron") and result["elbo_ppl"] is None


def test_fill_mask_json_with_and_without_model(capsys):
    code, out, _ = run(capsys, "fill-mask", "Bugün hava çok <mask>.", "--top-k", "3", "--json")
    assert code == 0 and len(last_json(out)["masks"][0]) == 3
    code, out, _ = run(capsys, "fill-mask", "preset:tiny", "<mask> ve <mask>", "--json")
    assert code == 0 and len(last_json(out)["masks"]) == 2


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["eval", "--data", "MISSING.txt"], 1, "data file not found"),
        (["eval", "--data", "bundled:heldout", "--mask-ratio", "1.5"], 2, "--mask-ratio must be in (0, 1)"),
        (["eval", "--data", "bundled:heldout", "--mask-ratio", "0"], 2, "--mask-ratio must be in (0, 1)"),
        (["eval", "NO_SUCH_DIR/", "--data", "bundled:heldout"], 1, "model folder not found"),
        (["fill-mask", "maskesiz cümle"], 2, "no <mask>"),
        (["fill-mask", "kelime " * 600 + "<mask>"], 2, "more than the model's context of 512"),
        (["eval", "--data", "bundled:heldout", "--samples", "0"], 2, "--samples"),
        (["nonsense"], 2, "No such command"),
    ],
)
def test_bad_input_is_one_line_without_traceback(capsys, argv, code, message):
    got, out, err = run(capsys, *argv)
    assert got == code
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in err


def test_bad_files(capsys, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("iyi satır\nkötü \xff\xfe".encode("latin-1", errors="ignore") + b"\xff\xfe\n")
    code, _, err = run(capsys, "eval", "--data", str(bad))
    assert code == 1 and "invalid UTF-8 at byte" in err and "line 2" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run(capsys, "eval", "--data", str(empty))
    assert code == 1 and "contains no text" in err
    incomplete = tmp_path / "model"
    incomplete.mkdir()
    (incomplete / "config.json").write_text('{"model_type": "modernbert"}')
    code, _, err = run(capsys, "eval", str(incomplete), "--data", "bundled:heldout")
    assert code == 1 and "incomplete" in err and len(err.strip().splitlines()) == 1


def test_the_installed_command_and_debug_traceback(tmp_path):
    command = [sys.executable, "-m", "diffutron", "eval", "--data", str(tmp_path / "none.txt")]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 1 and plain.stderr.strip() == f"error: data file not found: {tmp_path / 'none.txt'}"
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_data_prepare_bundled_offline_then_stats(capsys, tmp_path):
    out_dir = str(tmp_path / "prepared")
    code, out, _ = run(
        capsys, "data", "prepare", "--source", "bundled", "--max-length", "512", "--out", out_dir, "--json"
    )
    stats = last_json(out)
    assert code == 0 and stats["sequences"] > 1000 and stats["max_length"] == 512
    code, out, _ = run(capsys, "data", "stats", out_dir, "--json")
    assert code == 0 and last_json(out)["tokens"] == stats["tokens"]
    code, out, _ = run(capsys, "data", "stats", out_dir)
    assert code == 0 and "bundled" in out and "sequences" in out


def test_data_prepare_recipe_and_bad_input(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources:\n  - spec: bundled\npack:\n  max_length: 128\n  colour: red\n")
    code, _, err = run(capsys, "data", "prepare", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown key colour" in err and "valid keys: max_length" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    code, _, err = run(capsys, "data", "prepare", "--source", str(bad), "--out", str(tmp_path / "o2"))
    assert code == 1 and "yields no document (bad_json: 1)" in err
    code, _, err = run(capsys, "data", "prepare", "--source", "bundled:heldout", "--out", str(tmp_path / "o3"))
    assert code == 2 and "held-out" in err


def test_tokenizer_train_command(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["Ankara Türkiye'nin başkentidir.", "İzmir güzel bir şehirdir."] * 50))
    code, out, _ = run(
        capsys,
        "tokenizer",
        "train",
        "--source",
        str(text),
        "--vocab-size",
        "400",
        "--out",
        str(tmp_path / "tok"),
        "--json",
    )
    assert code == 0 and last_json(out)["mask_token"] == "[MASK]" and (tmp_path / "tok" / "tokenizer.json").is_file()
