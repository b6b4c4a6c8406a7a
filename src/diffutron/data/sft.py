"""Instruction data for SFT: JSONL records of `prompt`/`response`, or chat `messages`.

Layout of a sequence: `[CLS] prompt response [SEP] [SEP] ... [SEP]` up to `max_length`. The prompt
(with [CLS]) is never masked and never in the loss. The response is followed by end-of-sequence
tokens up to the full length, and those are part of the response: masked and learned like any other
token, so that the model learns to end its answer -- when sampling, a settled [SEP] ends the text
(LLaDA's SFT does the same with its |EOS| padding). Prompts are rendered by `diffutron.chat`
(the tokenizer's chat template when it has one, else a simple one), as the server renders chat.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from diffutron.chat import render_prompt
from diffutron.errors import DiffutronError
from diffutron.tokenizer import special_affixes


def _pairs(path: Path) -> list[tuple[list[dict], str]]:
    if not path.is_file():
        raise DiffutronError(f"instruction file not found: {path}")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DiffutronError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if isinstance(record.get("messages"), list) and record["messages"]:
            messages = record["messages"]
            if messages[-1].get("role") != "assistant":
                raise DiffutronError(f"{path}:{number}: the last message must be the assistant's")
            pairs.append((messages[:-1], messages[-1]["content"]))
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            pairs.append(([{"role": "user", "content": record["prompt"]}], record["response"]))
        else:
            raise DiffutronError(f"{path}:{number}: expected prompt/response strings or a messages list")
    if not pairs:
        raise DiffutronError(f"{path}: no instruction records")
    return pairs


def load_sft(path: str | Path, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Tensors `input_ids`, `attention_mask` and `prompt_mask` [N, max_length] for the SFT loop.

    `path` is a JSONL file, or `bundled:instructions` (the pairs shipped with diffutron).
    """
    if str(path) == "bundled:instructions":
        path = Path(str(resources.files("diffutron") / "data" / "instructions" / "tr-basic.jsonl"))
    prefix, suffix = special_affixes(tokenizer)
    eos = suffix[-1] if suffix else tokenizer.eos_token_id
    rows, prompt_lengths = [], []
    for messages, response in _pairs(Path(path)):
        prompt = prefix + tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        if len(prompt) + len(answer) > max_length:
            raise DiffutronError(
                f"{path}: a prompt + response of {len(prompt) + len(answer)} tokens exceeds {max_length}"
            )
        rows.append(prompt + answer + [eos] * (max_length - len(prompt) - len(answer)))
        prompt_lengths.append(len(prompt))
    ids = torch.tensor(rows)
    prompt_mask = torch.arange(max_length)[None, :] < torch.tensor(prompt_lengths)[:, None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_mask": prompt_mask}
