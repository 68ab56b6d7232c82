"""Shared fixtures: the embedded model (built once per machine), tiny checkpoints of the paper's model families, and a
tiny random Llama. The helpers behind them live in tests/support.py."""

import os

import pytest

pytest.register_assert_rewrite("support")  # its assertions report like a test's own


@pytest.fixture(scope="session")
def embedded_model_path() -> str:
    """Local path of the embedded SmolLM2-135M-Instruct checkpoint (built on first use)."""
    from retrieval_heads.models import ensure_embedded_model

    return str(ensure_embedded_model())


@pytest.fixture(scope="session")
def family_checkpoint(embedded_model_path, tmp_path_factory):
    """``family_checkpoint("qwen3")``: path of a family's tiny checkpoint (tests/families.py), built once."""
    from families import FAMILIES, build_checkpoint

    built = {}

    def checkpoint(name: str):
        if name not in built:
            built[name] = build_checkpoint(FAMILIES[name], embedded_model_path, tmp_path_factory.mktemp(name))
        return built[name]

    return checkpoint


@pytest.fixture
def tiny_model():
    """A 2-layer random Llama (4 query heads, 2 KV heads of 8), built in-process."""
    from support import tiny_llama

    return tiny_llama()


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
