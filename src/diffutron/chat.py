"""The chat template: a list of messages rendered as the prompt text the model continues.

One home for it, because the prompt a model is served must be the prompt it was trained on: SFT
renders its prompts here and the server renders `/v1/chat/completions` here. The tokenizer's own chat
template wins when it has one; else the simple Turkish template below.
"""

from __future__ import annotations

SIMPLE_TEMPLATE = "Kullanıcı: {prompt}\nAsistan: "


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text for `messages` (dicts with `role` and `content`), ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [m["content"] for m in messages if m.get("role") == "user"]
    return SIMPLE_TEMPLATE.format(prompt="\n".join(turns))
