"""Detection on the paper's model families (tiny Llama-3.1, Qwen3 and Olmo-3 checkpoints, tests/families.py).

Random weights never answer a NIAH question, so the trials here teacher-force the answer: a forward hook
on the model overwrites the logits of each decode step so that greedy decoding emits the needle's answer
tokens and then an EOS id. The attention rows, which are what detection scores, are untouched, and the
trial passes the ROUGE filter like a real retrieval.
"""

import contextlib

import pytest
import torch
from families import FAMILIES, eos_token_ids

from retrieval_heads import detect
from retrieval_heads.detect import DetectConfig, eos_ids, load_model, reference_scores, run_trial
from retrieval_heads.niah import build_prompt, builtin_needles

LENGTH = 150  # context tokens: past Olmo-3's 48-token window, short enough for ~1 s per trial
NEEDLE = 0


@pytest.fixture(scope="module")
def family_model(family_checkpoint):
    """``family_model("olmo3")``: (fp32 model, tokenizer) of a family's checkpoint, loaded once per module."""
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_model(str(family_checkpoint(name)), "float32")
        return loaded[name]

    return get


@contextlib.contextmanager
def teacher_forced(model, prompt_length: int, tokens: list[int]):
    """Greedy decoding emits ``tokens`` right after a ``prompt_length``-token prompt."""

    def force(module, args, kwargs, output):
        step = output.past_key_values.get_seq_length() - prompt_length  # tokens decoded so far
        if 0 <= step < len(tokens):
            output.logits[..., -1, :] = float("-inf")
            output.logits[..., -1, tokens[step]] = 0.0
        return output

    handle = model.register_forward_hook(force, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def scored_rows(monkeypatch):
    """Every (layers, heads) tensor of top-1 positions that detection scores, in call order."""
    rows = []
    score = detect.copy_scores

    def recording(top, token, prompt_ids, span):
        rows.append(top.clone())
        return score(top, token, prompt_ids, span)

    monkeypatch.setattr(detect, "copy_scores", recording)
    return rows


def forced_trial(model, tokenizer, depth: float, tail: list[int], config: DetectConfig | None = None):
    """Run one detection trial whose greedy answer is the needle's answer tokens followed by ``tail``."""
    config = config or DetectConfig(max_new_tokens=40)
    prompt = build_prompt(tokenizer, builtin_needles()[NEEDLE], LENGTH, depth,
                          chat_template_kwargs=config.chat_template_kwargs)
    start, end = prompt.answer_span
    answer = prompt.input_ids[start:end]
    with teacher_forced(model, len(prompt.input_ids), answer + tail):
        trial = run_trial(model, tokenizer, config, LENGTH, depth, NEEDLE)
    assert trial.prompt_ids == prompt.input_ids
    return trial, answer


def nonzero(scores) -> dict[str, float]:
    return {f"{l}-{h}": float(scores[l, h]) for l, h in scores.nonzero().tolist()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_trial_s_head_scores_equal_a_full_eager_computation(family, family_model, scored_rows):
    model, tokenizer = family_model(family)
    stop = min(eos_ids(model, tokenizer))
    total = 0.0
    for depth in (0.0, 0.5, 1.0):
        scored_rows.clear()
        trial, answer = forced_trial(model, tokenizer, depth, [stop])
        fast_rows = list(scored_rows)
        scored_rows.clear()
        reference = reference_scores(model, trial.prompt_ids, trial.generated_ids, trial.answer_span)
        assert trial.generated_ids == answer and trial.counted  # the forced answer passes the ROUGE filter
        # every head's top-1 position at every step, then the per-head scores of the trial
        assert len(fast_rows) == len(scored_rows) == len(answer)
        assert all(torch.equal(fast, eager) for fast, eager in zip(fast_rows, scored_rows)), f"{family} depth {depth}"
        assert trial.head_scores == nonzero(reference)
        total += sum(trial.head_scores.values())
    assert total > 0  # some head copies the needle, so the comparison covers scores as well as zeros


def test_sliding_window_layers_score_only_keys_inside_their_window(family_model, scored_rows):
    model, tokenizer = family_model("olmo3")
    window = model.config.sliding_window
    sliding = [i for i, kind in enumerate(model.config.layer_types) if kind == "sliding_attention"]
    assert sliding == [0, 1, 2] and window < LENGTH
    trial, answer = forced_trial(model, tokenizer, 0.0, [min(eos_ids(model, tokenizer))])
    _, end = trial.answer_span
    for step, top in enumerate(scored_rows):
        keys = len(trial.prompt_ids) + step  # positions the step's query attends over
        assert end <= keys - window  # the needle lies outside every sliding window
        assert ((top[sliding] >= keys - window) & (top[sliding] < keys)).all()
        assert (top[3] < keys).all()
    assert not [head for head in trial.head_scores if int(head.split("-")[0]) in sliding]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detection_stops_at_each_of_the_model_s_eos_ids(family, family_model, family_checkpoint):
    model, tokenizer = family_model(family)
    listed = eos_token_ids(FAMILIES[family], family_checkpoint(family))
    assert len(listed) == len(FAMILIES[family].generation_eos) >= 2
    assert set(listed) | {tokenizer.eos_token_id} == eos_ids(model, tokenizer)
    for eos in listed:
        trial, answer = forced_trial(model, tokenizer, 0.5, [eos, *answer_tail(tokenizer)])
        assert trial.generated_ids == answer, f"{family} did not stop at EOS id {eos}"
    # control: without an EOS the same forced tokens run on to max_new_tokens
    trial, answer = forced_trial(model, tokenizer, 0.5, answer_tail(tokenizer) * 20, DetectConfig(max_new_tokens=30))
    assert len(trial.generated_ids) == 30


def answer_tail(tokenizer) -> list[int]:
    return tokenizer.encode(" and more", add_special_tokens=False)


# The family's chat template around the NIAH body, as each released model renders one user turn.
RENDERED = {
    "llama3.1": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                 "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n",
                 "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen3": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),  # thinking off
    "olmo3": ("<|im_start|>system\nYou are a helpful function-calling AI assistant. You do not currently have "
              "access to any functions. <functions></functions><|im_end|>\n<|im_start|>user\n",
              "<|im_end|>\n<|im_start|>assistant\n"),
}
SPECIAL = {
    "llama3.1": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen3": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "olmo3": ["<|im_start|>", "<|im_end|>"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_niah_prompt_is_wrapped_in_the_family_s_chat_template_and_the_needle_is_found(family, family_model):
    _, tokenizer = family_model(family)
    needle = builtin_needles()[NEEDLE]
    prompt = build_prompt(tokenizer, needle, LENGTH, 0.5)
    text = tokenizer.decode(prompt.input_ids)
    head, tail = RENDERED[family]
    assert text.startswith(head + "<book>") and text.endswith(f"Question: {needle.question}\nAnswer:" + tail)
    ids = set(prompt.input_ids)
    assert all(tokenizer.convert_tokens_to_ids(token) in ids for token in SPECIAL[family])  # one id each, not text
    start, end = prompt.answer_span
    assert tokenizer.decode(prompt.input_ids[start:end]).strip() == needle.answer
    assert len(head) < text.index(needle.answer) < len(text) - len(tail)


def test_qwen3_detects_with_thinking_off_unless_the_config_turns_it_on(family_model):
    model, tokenizer = family_model("qwen3")
    assert DetectConfig().chat_template_kwargs == {"enable_thinking": False}
    config = DetectConfig(max_new_tokens=40, chat_template_kwargs={"enable_thinking": True})
    trial, answer = forced_trial(model, tokenizer, 0.5, [tokenizer.eos_token_id], config)
    text = tokenizer.decode(trial.prompt_ids)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<think>" not in text
    assert tokenizer.decode(trial.prompt_ids[slice(*trial.answer_span)]).strip() == builtin_needles()[NEEDLE].answer
    assert trial.generated_ids == answer
