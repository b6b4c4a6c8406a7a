"""`diffutron tokenizer train`: byte-level BPE tokenizers with the special tokens a masked LM needs."""

from __future__ import annotations

import typer

from diffutron.cli.common import (
    JsonOpt,
    SourceOpt,
    app,
    err,
    out,
    print_json,
)
from diffutron.errors import UsageError

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train subword tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    source: list[str] = SourceOpt,
    text_field: str = typer.Option("text", "--text-field"),
    vocab_size: int = typer.Option(16384, "--vocab-size", min=300),
    max_length: int = typer.Option(512, "--model-max-length", min=8),
    out_dir: str = typer.Option(..., "--out", help="the tokenizer folder to write (must be new or empty)"),
    force: bool = typer.Option(False, "--force", help="replace an existing non-empty --out folder"),
    as_json: bool = JsonOpt,
) -> None:
    """Train a byte-level BPE tokenizer with the special tokens a masked LM needs (the bundled one is one)."""
    from diffutron.data.sources import iter_documents
    from diffutron.tokenizer import train_tokenizer

    if not source:
        raise UsageError("name at least one --source (e.g. --source bundled)")
    documents = 0

    def texts():
        nonlocal documents
        for spec in source:
            for doc in iter_documents(spec, text_field, errors="count", training=True):
                documents += 1
                yield doc.text

    with err.status("training the tokenizer"):
        tok = train_tokenizer(texts(), vocab_size, out_dir, model_max_length=max_length, overwrite=force)
    result = {"out": out_dir, "vocab_size": len(tok), "documents": documents, "mask_token": tok.mask_token}
    if as_json:
        return print_json(result)
    out.print(f"wrote {out_dir}: {len(tok):,} tokens learned from {documents:,} documents")
