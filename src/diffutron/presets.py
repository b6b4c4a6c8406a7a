"""Architecture presets: ModernBERT encoders with random weights, built offline with the bundled tokenizer.

`preset:tiny` is the few-million-parameter model of tests and the bundled default's base;
`preset:mmbert-base` is the reference model's shape (jhu-clsp/mmBERT-base: 256k vocabulary, 768
hidden, 22 layers, global attention every 3rd layer, local window 128), 307.8M parameters, for
benchmarks. Its vocabulary is larger than the bundled tokenizer's: ids beyond it are never produced
by the tokenizer, which is all a speed or memory measurement needs.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=384,
        num_attention_heads=4,
        global_attn_every_n_layers=3,
        local_attention=128,
        max_position_embeddings=512,
    ),
    "mmbert-base": dict(
        vocab_size=256000,
        hidden_size=768,
        num_hidden_layers=22,
        intermediate_size=1152,
        num_attention_heads=12,
        global_attn_every_n_layers=3,
        local_attention=128,
        # mmBERT's RoPE reaches 8192; the reference system trains and evaluates at 512.
        max_position_embeddings=512,
    ),
}


def preset_config(name: str, tokenizer, **overrides):
    """A ModernBertConfig for preset `name` whose special ids are the tokenizer's."""
    from transformers import ModernBertConfig

    if name not in PRESETS:
        raise KeyError(name)
    settings = {"vocab_size": len(tokenizer), **PRESETS[name], **overrides}
    return ModernBertConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        **settings,
    )
