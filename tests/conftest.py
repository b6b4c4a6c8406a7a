"""Shared fixtures: tiny models built offline, and a guard that fails any test reaching for the network."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("localhost", "127.0.0.1", "::1") and not host.startswith("/"):
        raise RuntimeError(f"a test tried to reach the network: {address}")
    return _connect(self, address)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


@pytest.fixture(scope="session")
def tokenizer():
    from diffutron.tokenizer import load_bundled_tokenizer

    return load_bundled_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():
    from diffutron.model import DiffusionLM

    return DiffusionLM.from_pretrained("preset:tiny", device="cpu", seed=0)


def _build(kind: str, tokenizer):
    """Tiny BERT / RoBERTa / ModernBERT masked-LMs with random weights and the bundled tokenizer."""
    from transformers import AutoModelForMaskedLM, BertConfig, ModernBertConfig, RobertaConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = {
        "bert": lambda: BertConfig(max_position_embeddings=128, **common),
        "roberta": lambda: RobertaConfig(max_position_embeddings=130, **common),
        "modernbert": lambda: ModernBertConfig(max_position_embeddings=128, local_attention=16, **common),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(config).eval()


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory, tokenizer):
    """{architecture: saved HF folder} for the tiny models above."""
    folders = {}
    for kind in ("bert", "roberta", "modernbert"):
        folder = tmp_path_factory.mktemp(kind)
        _build(kind, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = str(folder)
    return folders


@pytest.fixture(scope="session")
def bundled_128(tmp_path_factory):
    """600 documents of the bundled corpus packed into 128-token sequences (the training tests' data)."""
    from diffutron.data.pack import PackConfig
    from diffutron.data.prepare import DataRecipe, prepare

    folder = tmp_path_factory.mktemp("data") / "bundled-128"
    prepare(DataRecipe(pack=PackConfig(max_length=128), max_documents=600), folder)
    return str(folder)
