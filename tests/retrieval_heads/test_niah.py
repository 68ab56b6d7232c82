"""NIAH prompts: needle at a sentence boundary in text, answer span located for any tokenizer."""

import pytest

from retrieval_heads.errors import RetmaskError
from retrieval_heads.niah import (
    NIAHGrid,
    build_prompt,
    builtin_haystack,
    builtin_needles,
    check_fits,
    insert_needles,
    sentence_boundaries,
)


@pytest.fixture(scope="module")
def smol_tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A different tokenizer family (whitespace-split BPE, no chat template), trained in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([builtin_haystack()], trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_builtin_text_ships_with_the_package_and_hides_no_answer():
    haystack = builtin_haystack().lower()
    assert len(haystack.split()) > 5000
    for needle in builtin_needles():
        assert needle.answer in needle.needle
        assert needle.answer.lower() not in haystack


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.33, 0.5, 0.9, 1.0])
def test_needle_lands_on_a_sentence_boundary_at_the_requested_depth(depth):
    context = builtin_haystack()[:5000]
    text, (at,) = insert_needles(context, ["NEEDLE SENTENCE."], [depth])
    assert text[at:].startswith("NEEDLE SENTENCE.")
    assert at - (1 if at else 0) in sentence_boundaries(context) or at in sentence_boundaries(context)
    assert abs(at / len(context) - depth) < 0.05
    if depth > 0.05:
        assert at > 0  # the reference code's token-id heuristic puts it at 0 for Llama-3/Qwen3 tokenizers


def test_many_needles_keep_their_order_and_depth_and_never_touch_the_text():
    context = builtin_haystack()[: sentence_boundaries(builtin_haystack())[40]].rstrip()  # ends with a full stop
    needles = ["FIRST AT THE START.", "SECOND AT THE START.", "MIDDLE.", "LAST AT THE END."]
    text, starts = insert_needles(context, needles, [0.0, 0.0, 0.5, 1.0])
    assert [text[s:].startswith(n) for s, n in zip(starts, needles)] == [True] * 4
    assert starts == sorted(starts)  # same boundary: the order given
    assert text.startswith("FIRST AT THE START. SECOND AT THE START. ") and text.endswith(". LAST AT THE END.")
    # Depths are measured on the needle-free context: removing the needles gives it back, spacing included.
    bare = text
    for needle in needles:
        bare = bare.replace(needle + " ", "", 1) if needle + " " in bare else bare.replace(" " + needle, "", 1)
    assert bare == context
    assert abs((starts[2] - len("FIRST AT THE START. SECOND AT THE START. ")) / len(context) - 0.5) < 0.05
    with pytest.raises(RetmaskError, match="between 0 and 1"):
        insert_needles(context, ["X."], [1.5])


@pytest.mark.parametrize("tokenizer_name", ["smol_tokenizer", "bpe_tokenizer"])
@pytest.mark.parametrize("length, depth", [(500, 0.0), (1000, 0.5), (2000, 1.0)])
def test_answer_span_holds_the_answer_tokens(request, tokenizer_name, length, depth):
    tokenizer = request.getfixturevalue(tokenizer_name)
    needle = builtin_needles()[0]
    prompt = build_prompt(tokenizer, needle, length, depth)
    start, end = prompt.answer_span
    decoded = tokenizer.decode(prompt.input_ids[start:end])
    assert decoded.replace(" ", "") == needle.answer.replace(" ", "")
    assert abs(prompt.needle_char - depth * prompt.context_chars) < 300  # within one sentence


def test_context_has_the_requested_token_length(smol_tokenizer):
    base = len(build_prompt(smol_tokenizer, builtin_needles()[1], 500, 0.5).input_ids)
    for length in (1000, 2000, 9000):  # 9000 tokens is longer than the essays: they repeat
        prompt = build_prompt(smol_tokenizer, builtin_needles()[1], length, 0.5)
        assert abs(len(prompt.input_ids) - base - (length - 500)) <= 8


def test_chat_models_get_their_chat_template(smol_tokenizer):
    prompt = build_prompt(smol_tokenizer, builtin_needles()[0], 300, 0.5)
    text = smol_tokenizer.decode(prompt.input_ids)
    assert text.startswith("<|im_start|>system") and text.rstrip().endswith("<|im_start|>assistant")
    assert "Based on the content of the book, Question: What is the best thing to do in San Francisco?" in text


def test_grid_enumerates_lengths_depths_and_needles():
    grid = NIAHGrid(lengths=(100, 200), depths=(0.0, 1.0), num_needles=3)
    assert len(grid.trials()) == 12 and len(set(grid.trials())) == 12


def test_length_above_the_models_context_is_refused():
    with pytest.raises(RetmaskError, match="context is 8192"):
        check_fits(8190, 50, 8192)
