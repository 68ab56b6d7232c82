"""The ablation check on the embedded model: masking its retrieval heads breaks needle retrieval, masking as
many other heads does not, and batching the prompts does not change the answers' scores."""

from __future__ import annotations

import pytest

from retrieval_heads.ablation import AblationConfig, grid_prompts, niah_accuracy
from retrieval_heads.detect import load_model
from retrieval_heads.masking import HeadMask
from retrieval_heads.models import shape_of
from retrieval_heads.niah import NIAHGrid

# The embedded model's top-5 heads from `retmask detect` (1K-2K trials, docs/BENCHMARKS.md), and five heads
# that score 0 there.
RETRIEVAL = [(17, 3), (18, 6), (18, 7), (20, 6), (23, 2)]
OTHER = [(2, 2), (14, 6), (22, 3), (24, 4), (29, 5)]


@pytest.fixture(scope="module")
def setup(embedded_model_path):
    model, tokenizer = load_model(embedded_model_path, "bfloat16")
    config = AblationConfig(model=embedded_model_path, lengths=(1000,), depths=(0.3, 0.7), num_needles=2,
                            batch_size=4, dtype="bfloat16")
    prompts = grid_prompts(tokenizer, NIAHGrid((1000,), (0.3, 0.7), 2), config, 8192)
    return model, tokenizer, config, prompts


@pytest.mark.slow
def test_masking_retrieval_heads_breaks_retrieval_and_other_heads_do_not(setup):
    model, tokenizer, config, prompts = setup
    shape = shape_of(model.config)
    plain, rows = niah_accuracy(model, tokenizer, HeadMask.for_shape([], shape), prompts, config)
    assert plain == 1.0 and [r["depth"] for r in rows] == [p.depth for p in prompts]  # rows keep prompt order
    assert niah_accuracy(model, tokenizer, HeadMask.for_shape(RETRIEVAL, shape), prompts, config)[0] == 0.0
    assert niah_accuracy(model, tokenizer, HeadMask.for_shape(OTHER, shape), prompts, config)[0] == 1.0


@pytest.mark.slow
def test_batched_decoding_scores_like_one_prompt_at_a_time(setup):
    model, tokenizer, config, prompts = setup
    shape = shape_of(model.config)
    one = AblationConfig(**{**config.__dict__, "batch_size": 1})
    for heads in ([], RETRIEVAL):
        mask = HeadMask.for_shape(heads, shape)
        batched = niah_accuracy(model, tokenizer, mask, prompts, config)
        one_by_one = niah_accuracy(model, tokenizer, mask, prompts, one)
        assert batched[0] == one_by_one[0]
