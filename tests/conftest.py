"""Shared fixtures: the embedded model (built once per machine) and a tiny random Llama."""

import os

import pytest


@pytest.fixture(scope="session")
def embedded_model_path() -> str:
    """Local path of the embedded SmolLM2-135M-Instruct checkpoint (built on first use)."""
    from retrieval_heads.models import ensure_embedded_model

    return str(ensure_embedded_model())


@pytest.fixture
def tiny_model():
    from retrieval_heads.models import tiny_llama

    return tiny_llama()


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
