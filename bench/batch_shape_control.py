"""Control for bench_mixed's token-identity column: does batch shape alone change seeded samples?

The plain model (no mask anywhere), the same 32 built-in prompts and per-prompt seeds, temperature 0.6 and
256 tokens, as one engine call of 32 and as two calls of 16; then the call of 32 again. If the split changes
answers while the repeat does not, a mixed batch differing from switched runs under sampling says nothing
about the gate: a different batch rounds some logits differently (bf16), and one flipped sample changes the
rest of the answer.

    python bench/batch_shape_control.py
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process, as in a generation actor

if __name__ == "__main__":
    from vllm import SamplingParams

    from pipeline.engine import EngineConfig, GatedLLM
    from pipeline.generate import prompt_seed
    from pipeline.prompts import load_prompts

    items = [p for batch in load_prompts("builtin", None, batch_size=64) for p in batch][:32]
    texts, seeds = [p.text for p in items], [prompt_seed(0, p.id) for p in items]
    sampling = SamplingParams(temperature=0.6, max_tokens=256)
    with GatedLLM.from_config(EngineConfig(max_model_len=1024, kv_cache_memory_bytes=1 << 30)) as engine:

        def run(*parts: slice) -> list:
            engine.llm.reset_prefix_cache()
            return [c.token_ids for part in parts for c in engine.generate(texts[part], sampling, seeds=seeds[part])]

        whole = run(slice(0, 32))
        halves = run(slice(0, 16), slice(16, 32))
        again = run(slice(0, 32))
        dtype = engine.llm.llm_engine.model_config.dtype
    differ = lambda a, b: sum(x != y for x, y in zip(a, b))  # noqa: E731
    print(f"one call of 32 vs two calls of 16: {differ(whole, halves)} of 32 answers differ; one call of 32 "
          f"repeated: {differ(whole, again)} of 32 differ ({dtype}, temperature 0.6, 256 tokens)")
