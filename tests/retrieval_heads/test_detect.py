"""Wu et al.'s retrieval score: copy-event arithmetic, the ROUGE filter, and exactness vs full attention."""

import json

import pytest
import torch

from retrieval_heads.detect import (
    DetectConfig,
    TrialRecord,
    copy_scores,
    detect,
    eos_ids,
    greedy_decode_scored,
    load_model,
    merge_trials,
    reference_scores,
    run_trial,
    top_positions,
)
from retrieval_heads.niah import build_prompt, builtin_needles
from retrieval_heads.scores import HeadScores

PROMPT = [10, 11, 12, 13, 14, 15, 16, 17]
SPAN = (3, 7)  # tokens 13, 14, 15, 16


def rows(tops, seq=len(PROMPT)):
    """(layers=1, heads, seq) attention whose top-1 for head i is tops[i]."""
    out = torch.full((1, len(tops), seq), 0.01)
    for head, position in enumerate(tops):
        out[0, head, position] = 0.9
    return out


def test_copy_event_scores_one_over_span_length():
    scores = copy_scores(top_positions(rows([4, 4, 1])), token=14, prompt_ids=PROMPT, span=SPAN)
    assert scores.tolist() == [[0.25, 0.25, 0.0]]


def test_attending_the_span_without_copying_that_token_scores_nothing():
    assert copy_scores(top_positions(rows([5])), token=14, prompt_ids=PROMPT, span=SPAN).sum() == 0


def test_same_token_outside_the_span_scores_nothing():
    prompt = PROMPT[:1] + [14] + PROMPT[2:]
    assert copy_scores(top_positions(rows([1])), token=14, prompt_ids=prompt, span=SPAN).sum() == 0


def test_a_top_position_among_generated_tokens_is_not_a_copy():
    longer = torch.full((1, 1, len(PROMPT) + 3), 0.01)
    longer[0, 0, len(PROMPT) + 1] = 0.9  # the head attends a generated token, not the needle
    assert copy_scores(top_positions(longer), token=14, prompt_ids=PROMPT, span=SPAN).sum() == 0


def test_ties_break_to_the_first_position():
    tied = torch.zeros(1, 1, len(PROMPT))
    tied[0, 0, [2, 4]] = 0.5  # position 2 (outside the span) wins the tie
    assert copy_scores(top_positions(tied), token=14, prompt_ids=PROMPT, span=SPAN).sum() == 0


def record(counted, scores):
    return TrialRecord(1, 0.5, 0, PROMPT, SPAN, [], "", 1.0 if counted else 0.0, counted, scores)


def test_failed_trials_add_nothing_and_counted_trials_add_zeros():
    merged = merge_trials([record(True, {"0-1": 1.25}), record(False, {"0-1": 9.0}), record(True, {})], 1, 2)
    assert merged.trials == {(0, 0): [0.0, 0.0], (0, 1): [1.25, 0.0]}
    assert merged.mean()[(0, 1)] == pytest.approx(0.625)


@pytest.fixture(scope="module")
def smol(embedded_model_path):
    return load_model(embedded_model_path, "float32")


@pytest.mark.slow
def test_fast_scorer_matches_full_attention_reference(smol):
    model, tokenizer = smol
    prompt = build_prompt(tokenizer, builtin_needles()[0], 600, 0.5)
    generated, fast = greedy_decode_scored(model, prompt, 30, eos_ids(model, tokenizer))
    reference = reference_scores(model, prompt.input_ids, generated, prompt.answer_span)
    assert fast.sum() > 0  # the model copies the needle, so some heads score
    assert torch.allclose(fast.cpu(), reference, atol=1e-6)


@pytest.mark.slow
def test_decoding_stops_at_eos_and_the_answer_passes_rouge(smol):
    model, tokenizer = smol
    trial = run_trial(model, tokenizer, DetectConfig(max_new_tokens=50), 800, 0.25, 0)
    assert trial.counted and trial.rouge1_recall > 0.5
    assert len(trial.generated_ids) < 50
    assert not set(trial.generated_ids) & eos_ids(model, tokenizer)


@pytest.mark.slow
def test_detect_writes_wu_scores_trial_records_and_heatmap(embedded_model_path, tmp_path):
    config = DetectConfig(model=embedded_model_path, lengths=(500,), depths=(0.3, 0.8), num_needles=1,
                          max_new_tokens=24)
    scores = detect(config, tmp_path)
    loaded = HeadScores.load(tmp_path / "head_scores.json")
    assert len(loaded.trials) == 270 and loaded.trials == scores.trials
    records = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert {"prompt_ids", "answer_span", "generated_ids", "rouge1_recall", "counted"} <= set(records[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials_counted"] == loaded.num_trials() == sum(r["counted"] for r in records)
    assert (tmp_path / "head_scores.png").stat().st_size > 1000
