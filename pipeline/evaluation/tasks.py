"""Synthetic long-context tasks in the style of RULER (Hsieh et al., 2024), registered by name.

- ``niah_single``      one "special magic number for KEY is VALUE" needle in the essays; ask for it.
- ``niah_multikey``    the same plus 3 distractor needles with other keys.
- ``niah_multivalue``  4 needles with one key and 4 values; all 4 must come back.
- ``niah_multiquery``  4 needles with 4 keys; ask for all 4 values.
- ``variable_tracking`` two chains ``VAR A = 12345. VAR B = VAR A. ...`` (5 variables each) in the
                       essays; list every variable equal to the first chain's value.
- ``common_words``     a numbered word list (no essays) where 5 words repeat far more often; name them.
- ``qa``               10 fact sentences about invented people, places and societies in the essays; a
                       question that one fact answers.

A task makes a ``Draft`` from ``(rng, depth)``: instruction, question, answers, and the needles with their
depths (0 = start, 1 = end; the target's depth is stratified over the cell by the caller, the others are
uniform). ``pipeline.evaluation.fitting`` turns drafts into prompts of a given token length. Everything
comes from text shipped in the package (``retrieval_heads/data/haystack.txt``; keys and the word list are
its words; QA entities are invented syllable names that the essays do not contain) and from the ``rng``.

Scoring is RULER's ``string_match_all`` (recall of the expected strings in the output, 0-1), with
case/whitespace folding and whole-token matching (so ``1234567`` does not match ``12345678``).
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from retrieval_heads.errors import RetmaskError
from retrieval_heads.niah import builtin_haystack


@dataclass(frozen=True)
class Draft:
    """A task's sample before it is fitted to a token budget."""

    instruction: str
    question: str
    answers: tuple[str, ...]
    needles: tuple[str, ...] = ()
    depths: tuple[float, ...] = ()
    # When set, the context is the first n of these lines instead of the essays.
    lines: Callable[[int], tuple[str, ...]] | None = None


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


def get_task(name: str, option: str = "tasks") -> Task:
    """The registered task ``name``; an unknown name is a user error that suggests the nearest valid one and
    names the ``option`` to fix."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, list(TASKS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise RetmaskError(f"unknown eval task {name!r}{hint}; valid tasks: {', '.join(TASKS)}; fix the {option} option")


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
        syllables = rng.randint(2, 3)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
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


def _niah(rng: random.Random, depth: float, keys: list[str], values: list[str], question: str,
          answers: list[str]) -> Draft:
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
    ("The old lighthouse on {place} Island was painted by {person}.",
     "Who painted the old lighthouse on {place} Island?", "person"),
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
    intro = ("Answer the question based on the following text. "
             "Only give me the answer and do not output any other words.")
    return Draft(intro, f"Question: {question}", (answer,), tuple(facts), depths)
