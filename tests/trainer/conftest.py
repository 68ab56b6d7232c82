"""Trainer fixtures: shard directories, crafted pairs, and a tiny Llama sharing the embedded tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from pairs_fixtures import VARIANTS, crafted_rows, write_shards


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a CPU shared with other jobs, OpenMP barrier waits made 2 threads ~3x slower
    than 1 (measured: 305 s vs 83 s for the embedded-model run)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_shards(tmp_path):
    def make(rows: list[dict], name: str = "pairs", variants: list[str] = VARIANTS) -> Path:
        return write_shards(tmp_path / name, rows, variants)

    return make


@pytest.fixture(scope="session")
def crafted_pairs_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("crafted") / "pairs", crafted_rows(48))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, embedded_model_path) -> str:
    """A 2-layer random Llama saved with the embedded tokenizer (vocab 49152), so it trains in seconds."""
    from transformers import AutoTokenizer

    from retrieval_heads.models import tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=49152)
    model.config.pad_token_id = 2
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path).save_pretrained(path)
    return str(path)
