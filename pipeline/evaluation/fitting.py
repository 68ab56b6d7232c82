"""The suite: every task's drafts fitted to a token length in the model's chat template, seeded.

``length`` is the whole user turn after the model's chat template, in that model's tokens; the context is
cut at a sentence (or list-line) boundary so a prompt lands at most one sentence (<= 48 tokens for the
embedded tokenizer) below it. Needles go at the sentence boundary nearest their depth
(``retrieval_heads.niah.insert_needles``, the same placement detection uses).

Sample ``i`` of a cell comes from ``random.Random(f"{seed}/{task}/{length}/{i}")``, so it never depends on
which other tasks or lengths were asked for, and every checkpoint sees the same samples (the paired design
of ``pipeline.evaluation.statistics``). The target's depth, ``i / (samples_per_cell - 1)``, depends only on the
cell's own sample count. So a suite of explicit cells (``cells=["niah_multikey@2000", ...]``, what the study's
calibration selects) holds exactly the samples the full grid holds for those cells, in any order or company.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.evaluation.tasks import TASKS, Draft, get_task
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import render_chat
from retrieval_heads.niah import builtin_haystack, insert_needles, sentence_boundaries

SAMPLES_PER_CELL = 20  # why 20: the sample-size reasoning in pipeline.evaluation.statistics
DEFAULT_LENGTHS = (1000, 2000, 4000)


@dataclass(frozen=True)
class EvalSample:
    """One prompt with its expected answers; ``depths[i]`` is where ``needles[i]`` was asked to go."""

    id: str
    task: str
    length: int  # target tokens of the chat-rendered user turn
    prompt: str  # the user message: instruction, context, question
    answers: tuple[str, ...]
    needles: tuple[str, ...]  # sentences inserted into the context (empty for common_words)
    depths: tuple[float, ...]
    num_tokens: int  # measured tokens of the rendered prompt, <= length
    context_span: tuple[int, int]  # [start, end) of the context inside ``prompt``
    max_tokens: int  # answer budget


class PromptCounter:
    """Tokens of a user turn after the model's chat template, counted as ``GatedLLM.render`` does."""

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None):
        self.tokenizer, self.kwargs = tokenizer, dict(chat_template_kwargs or {})
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def __call__(self, prompt: str) -> int:
        if not self.chat:
            return len(self.tokenizer(prompt)["input_ids"])
        text = render_chat(self.tokenizer, prompt, **self.kwargs)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class _Source:
    """Context text with its allowed cut points and the token count of every prefix up to a cut."""

    text: str
    cuts: list[int]
    token_ends: list[int]  # character end of every token of ``text``

    @classmethod
    def of(cls, tokenizer, text: str, cuts: list[int]) -> "_Source":
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return cls(text, cuts, [end for _, end in offsets])

    def tokens_before(self, cut: int) -> int:
        return bisect.bisect_right(self.token_ends, cut)


def _essays(tokenizer, min_tokens: int) -> _Source:
    text = builtin_haystack()
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < min_tokens:
        text += "\n\n" + builtin_haystack()  # contexts longer than the essays repeat them (as niah.py does)
    return _Source.of(tokenizer, text, [b for b in sentence_boundaries(text) if b > 0])


def _lines(tokenizer, lines: tuple[str, ...]) -> _Source:
    text = "\n".join(lines)
    cuts = [m.start() for m in re.finditer("\n", text)] + [len(text)]
    return _Source.of(tokenizer, text, cuts)


def _assemble(draft: Draft, context: str) -> tuple[str, tuple[int, int]]:
    head = draft.instruction + "\n\n"
    return f"{head}{context}\n\n{draft.question}", (len(head), len(head) + len(context))


def _fit(draft: Draft, source: _Source, length: int, count: PromptCounter,
        task: str) -> tuple[str, tuple[int, int], int]:
    """The longest context (whole sentences or lines) whose rendered prompt is at most ``length`` tokens;
    returns the prompt, the context's span in it and the prompt's token count."""
    overhead = count(_assemble(draft, " ".join(draft.needles))[0])
    if overhead >= length:
        raise RetmaskError(f"length {length} is too short for task {task} (its question and needles take "
                           f"{overhead} tokens); use longer lengths")
    k = bisect.bisect_right([source.tokens_before(c) for c in source.cuts], length - overhead) - 1
    while k >= 0:  # token counts are not exactly additive across joins: step back until it fits
        context, _ = insert_needles(source.text[: source.cuts[k]].rstrip(), draft.needles, draft.depths)
        prompt, span = _assemble(draft, context)
        tokens = count(prompt)
        if tokens <= length:
            return prompt, span, tokens
        k -= 1
    raise RetmaskError(f"length {length} is too short for task {task}; use longer lengths")


def format_cell(task: str, length: int) -> str:
    """The ``task@length`` spelling of a cell (``EvalConfig.cells``, ``--cells``)."""
    return f"{task}@{length}"


def parse_cells(cells: Sequence[str | tuple[str, int]]) -> list[tuple[str, int]]:
    """``["task@length", ...]`` (or ``(task, length)`` pairs) -> ``[(task, length), ...]`` in the given order;
    an empty list, a malformed or repeated cell, an unknown task or a length below 1 is a one-line error."""
    if not cells:
        raise RetmaskError("cells is empty; list task@length cells (e.g. niah_multikey@2000) or leave cells unset "
                           "for the full tasks x lengths grid")
    parsed: list[tuple[str, int]] = []
    for cell in cells:
        text = format_cell(*cell) if isinstance(cell, tuple) else str(cell)
        task, sep, length = (part.strip() for part in text.partition("@"))
        if not sep or not task or not re.fullmatch(r"\d+", length):
            raise RetmaskError(f"cell {text!r} is not task@length (e.g. niah_multikey@2000); fix the cells option")
        if int(length) < 1:
            raise RetmaskError(f"cell {text!r} has length {length}; a length is a number of tokens >= 1; "
                               "fix the cells option")
        try:
            get_task(task, option="cells")
        except RetmaskError as err:
            raise RetmaskError(f"cell {text!r}: {err}") from None
        if (task, int(length)) in parsed:
            raise RetmaskError(f"cell {text!r} is listed twice; list every cell once in the cells option")
        parsed.append((task, int(length)))
    return parsed


def build_suite(
    tokenizer,
    tasks: tuple[str, ...] = tuple(TASKS),
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    samples_per_cell: int = SAMPLES_PER_CELL,
    seed: int = 0,
    max_context: int | None = None,
    chat_template_kwargs: dict | None = None,
    max_tokens: int | None = None,
    cells: Sequence[str | tuple[str, int]] | None = None,
) -> list[EvalSample]:
    """All samples, cell by cell: the grid ``tasks`` x ``lengths`` (task by task, length by length), or exactly
    ``cells`` (``task@length``, in their order; ``tasks`` and ``lengths`` are then unused). ``max_tokens``
    overrides every task's answer budget."""
    if cells is None:
        chosen = [get_task(name) for name in tasks]
        if samples_per_cell < 1 or not lengths:
            raise RetmaskError("need at least one length and one sample per cell")
        grid = [(task, length) for task in chosen for length in lengths]
    else:
        grid = [(get_task(name), length) for name, length in parse_cells(cells)]
        if samples_per_cell < 1:
            raise RetmaskError("need at least one sample per cell")
    for name in dict.fromkeys(task.name for task, _ in grid):
        budget = max_tokens or get_task(name).max_tokens
        too_long = [n for task, n in grid if task.name == name and max_context and n + budget > max_context]
        if too_long:
            raise RetmaskError(f"length {max(too_long)} + {budget} answer tokens ({name}) exceeds the model's "
                               f"context of {max_context} tokens; use lengths <= {max_context - budget}")
    count = PromptCounter(tokenizer, chat_template_kwargs)
    essays = _essays(tokenizer, max((n for _, n in grid), default=0))
    samples = []
    for task, length in grid:
        for i in range(samples_per_cell):
            rng = random.Random(f"{seed}/{task.name}/{length}/{i}")  # str seeds are stable across processes
            draft = task.make(rng, i / (samples_per_cell - 1) if samples_per_cell > 1 else 0.5)
            # A list line is >= 4 tokens, so length // 4 + 1 lines are always enough.
            source = essays if draft.lines is None else _lines(tokenizer, draft.lines(length // 4 + 1))
            prompt, span, tokens = _fit(draft, source, length, count, task.name)
            answers = draft.answers
            if draft.lines is not None:
                answers = _most_common(prompt[span[0]: span[1]], draft.answers)
            samples.append(EvalSample(f"{task.name}/{length}/{i}", task.name, length, prompt, answers,
                                      draft.needles, draft.depths, tokens, span, max_tokens or task.max_tokens))
    return samples


def _most_common(context: str, expected: tuple[str, ...]) -> tuple[str, ...]:
    """The common words, checked to still beat every other word after the list was cut to length."""
    counts: dict[str, int] = {}
    for word in re.findall(r"^\d+\. (\S+)$", context, flags=re.M):
        counts[word] = counts.get(word, 0) + 1
    rest = max((c for w, c in counts.items() if w not in expected), default=0)
    if min(counts.get(w, 0) for w in expected) <= rest:
        raise RuntimeError(f"common words {expected} no longer stand out in a list of {sum(counts.values())} lines")
    return expected
