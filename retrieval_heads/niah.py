"""Needle-in-a-haystack prompts built in text space, so needle placement works for every tokenizer.

The needle goes at a sentence boundary found in the text (not via tokenizer-specific token ids, which
put it at character 0 for Llama-3/Qwen3/Olmo-3 in the reference code), then the whole prompt is
tokenized once and the answer's token span is located through the tokenizer's character offsets.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import render_chat

PROMPT_TEMPLATE = "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
# Chat-template variables for NIAH prompts: RetMask detects with Qwen3's thinking off (docs/METHOD.md section 1);
# templates without the variable ignore it.
NIAH_CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


@dataclass(frozen=True)
class Needle:
    needle: str
    question: str
    answer: str  # the short span scored by ROUGE and by copy events (Wu's ``real_needle``)


@dataclass(frozen=True)
class NIAHGrid:
    """Context lengths (tokens) x needle depths (0 = start, 1 = end) x needles."""

    lengths: tuple[int, ...] = (500, 1000, 2000, 4000)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    num_needles: int = 3

    def trials(self) -> list[tuple[int, float, int]]:
        return [(l, d, n) for n in range(self.num_needles) for l in self.lengths for d in self.depths]


@dataclass
class NIAHPrompt:
    input_ids: list[int]
    answer_span: tuple[int, int]  # [start, end) token positions of the answer inside input_ids
    needle: Needle
    length: int
    depth: float
    needle_char: int = 0  # where the needle landed in the context text
    context_chars: int = 0
    meta: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def builtin_haystack() -> str:
    """Original essay text shipped with the package (not read from the stdlib, which changes)."""
    return resources.files("retrieval_heads").joinpath("data/haystack.txt").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def builtin_needles() -> tuple[Needle, ...]:
    raw = json.loads(resources.files("retrieval_heads").joinpath("data/needles.json").read_text(encoding="utf-8"))
    return tuple(Needle(**item) for item in raw)


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a new sentence starts (plus 0 and len(text))."""
    return [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]


def insert_needles(context: str, needles: Sequence[str], depths: Sequence[float]) -> tuple[str, list[int]]:
    """Insert every needle at the sentence boundary nearest its ``depth`` of the context; returns the text and
    where each needle starts in it.

    Depths are fractions of the needle-free context (0 = start, 1 = end), so one needle never moves another;
    needles at the same boundary keep their order (the eval suite's variable chains rely on it). A space
    separates a needle from text that has none, and nothing else changes.
    """
    if len(needles) != len(depths):
        raise ValueError(f"{len(needles)} needles but {len(depths)} depths")
    bounds = sentence_boundaries(context)
    spots = []
    for order, depth in enumerate(depths):
        if not 0.0 <= depth <= 1.0:
            raise RetmaskError(f"needle depth {depth} must be between 0 and 1")
        target = int(round(depth * len(context)))
        i = bisect.bisect_left(bounds, target)
        spots.append((min(bounds[max(0, i - 1) : i + 1], key=lambda b: abs(b - target)), order))
    text, starts, last = "", [0] * len(needles), 0
    for pos, order in sorted(spots):
        text = _joined(_joined(text, context[last:pos]), needles[order])
        starts[order] = len(text) - len(needles[order])
        last = pos
    return _joined(text, context[last:]), starts


def _joined(text: str, piece: str) -> str:
    """``text + piece`` with a space between them where neither side has whitespace."""
    gap = text and piece and not text.endswith((" ", "\n")) and not piece.startswith((" ", "\n"))
    return text + " " + piece if gap else text + piece


def build_prompt(tokenizer, needle: Needle, length: int, depth: float, haystack: str | None = None,
                 chat: bool | None = None, chat_template_kwargs: dict | None = None) -> NIAHPrompt:
    """Build one NIAH prompt whose context (haystack + needle) is ``length`` tokens long.

    ``chat_template_kwargs`` (default ``NIAH_CHAT_TEMPLATE_KWARGS``) go to the model's chat template.
    """
    haystack = haystack if haystack is not None else builtin_haystack()
    if needle.answer not in needle.needle:
        raise RetmaskError(f"needle answer {needle.answer!r} is not part of the needle sentence")
    needle_tokens = len(tokenizer(" " + needle.needle, add_special_tokens=False)["input_ids"])
    budget = max(0, length - needle_tokens)
    context = _prefix_with_tokens(tokenizer, haystack, budget)
    context, (needle_at,) = insert_needles(context, [needle.needle], [depth])
    body = PROMPT_TEMPLATE.format(context=context, question=needle.question)
    use_chat = chat if chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        kwargs = NIAH_CHAT_TEMPLATE_KWARGS if chat_template_kwargs is None else chat_template_kwargs
        text = render_chat(tokenizer, body, **kwargs)
        special = False  # the template already carries BOS and role markers
    else:
        text, special = body, True
    body_at = text.index(body)
    answer_start = body_at + body.index(context) + needle_at + needle.needle.index(needle.answer)
    answer_end = answer_start + len(needle.answer)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    span = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > answer_start and s < answer_end and e > s]
    if not span:
        raise RetmaskError("could not locate the needle's answer tokens in the prompt; the tokenizer's offsets look "
                           "broken")
    return NIAHPrompt(
        input_ids=list(enc["input_ids"]),
        answer_span=(span[0], span[-1] + 1),
        needle=needle,
        length=length,
        depth=depth,
        needle_char=needle_at,
        context_chars=len(context),
    )


def _prefix_with_tokens(tokenizer, haystack: str, num_tokens: int) -> str:
    """The longest prefix of the (repeated) haystack that is at most ``num_tokens`` tokens."""
    if num_tokens <= 0:
        return ""
    text = haystack
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    while len(enc["input_ids"]) < num_tokens:  # repeat the essays for contexts longer than the text
        text = text + "\n\n" + haystack
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end = enc["offset_mapping"][num_tokens - 1][1]
    return text[:end]


def check_fits(prompt_tokens: int, max_new_tokens: int, max_context: int, what: str = "NIAH length") -> None:
    """Refuse prompts that would run past the model's context window."""
    if max_context and prompt_tokens + max_new_tokens > max_context:
        raise RetmaskError(
            f"{what} needs {prompt_tokens} + {max_new_tokens} tokens but the model's context is {max_context}; "
            "use shorter lengths"
        )
