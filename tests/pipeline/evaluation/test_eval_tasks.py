"""The synthetic long-context suite: answers really in the context, at the stated depth and length, seeded."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from pipeline.evaluation.fitting import PromptCounter, build_suite
from pipeline.evaluation.tasks import TASKS, Draft, found, get_task, recall, register_task
from retrieval_heads.errors import RetmaskError
from retrieval_heads.niah import sentence_boundaries

LENGTHS = (1000, 2000, 4000)
N = 4


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


@pytest.fixture(scope="module")
def suite(tokenizer):
    return build_suite(tokenizer, lengths=LENGTHS, samples_per_cell=N, seed=0, max_context=8192)


def _context(s):
    return s.prompt[s.context_span[0]: s.context_span[1]]


def test_every_registered_task_is_built(suite):
    assert set(TASKS) == {"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
                          "common_words", "qa"}
    assert Counter((s.task, s.length) for s in suite) == {(t, n): N for t in TASKS for n in LENGTHS}


def test_expected_answers_are_in_the_context(suite):
    for s in suite:
        context = _context(s)
        assert s.answers and all(found(context, a) for a in s.answers), s.id
        assert recall(context, s.answers) == 1.0
        if s.task.startswith("niah") or s.task == "qa":
            # each expected value sits in exactly one needle, so nothing else in the context can answer
            assert all(context.count(a) == 1 for a in s.answers), s.id


def test_the_question_names_what_is_asked(suite):
    for s in (s for s in suite if s.task in ("niah_single", "niah_multikey")):
        key = re.search(r"magic number for (\S+) mentioned", s.prompt).group(1)
        assert f"for {key} is: {s.answers[0]}." in _context(s)
    for s in (s for s in suite if s.task == "niah_multikey"):
        assert sum(n.startswith("One of the special magic numbers") for n in s.needles) == 4  # 3 distractors


def test_common_words_are_the_most_frequent(suite):
    for s in (s for s in suite if s.task == "common_words"):
        counts = Counter(re.findall(r"^\d+\. (\S+)$", _context(s), flags=re.M))
        top = {w for w, _ in counts.most_common(len(s.answers))}
        assert top == set(s.answers)
        assert min(counts[w] for w in s.answers) >= 2 * max(c for w, c in counts.items() if w not in s.answers)


def test_variable_chains_keep_assignment_order(suite):
    for s in (s for s in suite if s.task == "variable_tracking"):
        context = _context(s)
        value = re.search(r"assigned the value (\d+)", s.prompt).group(1)
        first, second = f"VAR {s.answers[0]} = {value}.", f"VAR {s.answers[1]} = VAR {s.answers[0]}."
        assert context.index(first) < context.index(second)
        for a, b in zip(s.answers, s.answers[1:]):
            assert f"VAR {b} = VAR {a}." in context


def test_needles_sit_at_their_stated_depth(suite):
    for s in (s for s in suite if s.needles):
        context = _context(s)
        where = sorted((context.index(n), n) for n in s.needles)
        inserted = sum(len(n) + 1 for n in s.needles)
        bare = len(context) - inserted
        bounds = sentence_boundaries(context)
        # the nearest boundary is within one sentence
        tolerance = max(b - a for a, b in zip(bounds, bounds[1:])) / bare
        for needle, depth in zip(s.needles, s.depths):
            pos = context.index(needle)
            before = sum(len(n) + 1 for p, n in where if p < pos)
            assert abs((pos - before) / bare - depth) <= tolerance, (s.id, needle, depth)


def test_target_depths_are_stratified_over_the_cell(suite):
    depths = [s.depths[0] for s in suite if s.task == "niah_single" and s.length == 1000]
    assert depths == [i / (N - 1) for i in range(N)]


def test_prompt_lengths_hit_the_target(suite, tokenizer):
    count = PromptCounter(tokenizer)
    for s in suite:
        assert 0.95 * s.length <= s.num_tokens <= s.length, s.id
    for s in suite[::7]:  # an independent recount through the chat template, as GatedLLM.render does
        text = tokenizer.apply_chat_template([{"role": "user", "content": s.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == s.num_tokens == count(s.prompt)


def test_longest_default_length_fits_the_embedded_model(tokenizer):
    samples = build_suite(tokenizer, lengths=(8000,), samples_per_cell=1, max_context=8192)
    assert all(7600 <= s.num_tokens <= 8000 and s.num_tokens + s.max_tokens <= 8192 for s in samples)


def test_same_seed_same_samples_other_seed_other_samples(tokenizer, suite):
    again = build_suite(tokenizer, lengths=LENGTHS, samples_per_cell=N, seed=0, max_context=8192)
    assert again == suite
    other = build_suite(tokenizer, tasks=("niah_single", "qa"), lengths=(1000,), samples_per_cell=N, seed=1)
    assert not {s.prompt for s in other} & {s.prompt for s in suite}


def test_a_sample_does_not_depend_on_the_rest_of_the_suite(tokenizer, suite):
    subset = build_suite(tokenizer, tasks=("qa",), lengths=(2000,), samples_per_cell=N, seed=0)
    assert subset == [s for s in suite if s.task == "qa" and s.length == 2000]


def test_samples_in_a_cell_are_distinct(suite):
    for cell in {(s.task, s.length) for s in suite}:
        prompts = [s.prompt for s in suite if (s.task, s.length) == cell]
        assert len(set(prompts)) == len(prompts)
        answers = [s.answers for s in suite if (s.task, s.length) == cell]
        assert len(set(answers)) == len(answers)


def test_lengths_past_the_context_are_refused(tokenizer):
    with pytest.raises(RetmaskError, match="exceeds the model's context of 8192"):
        build_suite(tokenizer, tasks=("niah_single",), lengths=(1000, 8192), samples_per_cell=1, max_context=8192)
    with pytest.raises(RetmaskError, match="too short"):
        build_suite(tokenizer, tasks=("qa",), lengths=(100,), samples_per_cell=1)
    with pytest.raises(RetmaskError, match="unknown eval task"):
        build_suite(tokenizer, tasks=("ruler_everything",), lengths=(1000,), samples_per_cell=1)


def test_answer_budget_override(tokenizer):
    samples = build_suite(tokenizer, tasks=("niah_single", "common_words"), lengths=(1000,), samples_per_cell=1,
                          max_tokens=16)
    assert {s.max_tokens for s in samples} == {16}


@pytest.mark.parametrize(
    "output, answers, expected",
    [
        ("The special magic number is 4821937.", ("4821937",), 1.0),  # exact
        ("4821937, 1111111", ("4821937", "1234567", "7654321", "1111111"), 0.5),  # partial
        ("I could not find it.", ("4821937",), 0.0),  # none
        ("48219370", ("4821937",), 0.0),  # a longer number is not the answer
        ("The town is ASHCOMBE", ("Ashcombe",), 1.0),  # case
        ("Brenvo\n   Talmirek painted it", ("Brenvo Talmirek",), 1.0),  # whitespace
        ("reviewed, shows\tclimb", ("shows", "climb", "reviews"), 2 / 3),
        ("anything", ("thing",), 0.0),  # whole words only
        ("", (), 0.0),
    ],
)
def test_string_match_recall(output, answers, expected):
    assert recall(output, answers) == pytest.approx(expected)


def test_tasks_register_by_name(tokenizer):
    @register_task("echo_test", max_tokens=8)
    def echo(rng, depth):
        value = str(rng.randrange(10**6, 10**7))
        return Draft("Remember the code.", "What is the code?", (value,), (f"The code is {value}.",), (depth,))

    try:
        (sample,) = build_suite(tokenizer, tasks=("echo_test",), lengths=(500,), samples_per_cell=1)
        assert sample.answers[0] in sample.prompt and sample.max_tokens == 8 and sample.num_tokens <= 500
    finally:
        del TASKS["echo_test"]


def test_a_misspelt_task_is_refused_with_the_nearest_name_and_the_valid_ones():
    with pytest.raises(RetmaskError, match=r"unknown eval task 'niah_singel' \(did you mean niah_single\?\)") as err:
        get_task("niah_singel")
    assert all(name in str(err.value) for name in TASKS) and "\n" not in str(err.value)
    with pytest.raises(RetmaskError) as err:
        get_task("zzzz")  # nothing close: no guess, still the valid names
    assert "did you mean" not in str(err.value) and "valid tasks: niah_single" in str(err.value)
    assert get_task("qa") is TASKS["qa"]


def test_the_suite_refuses_a_misspelt_task_before_building_anything():
    class Untouchable:  # any use of the tokenizer would fail the test
        def __getattr__(self, name):
            raise AssertionError(f"tokenizer used: {name}")

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenizer called")

    with pytest.raises(RetmaskError, match="did you mean common_words"):
        build_suite(Untouchable(), tasks=("qa", "comon_words"), lengths=(1000,), samples_per_cell=1)
