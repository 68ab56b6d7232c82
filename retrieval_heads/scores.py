"""Head scores in Wu et al.'s JSON format, selection strategies and sparsity statistics."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import ModelShape

Head = tuple[int, int]  # (layer, head), 0-indexed query heads


@dataclass
class HeadScores:
    """Per-trial retrieval scores of every head: ``{(layer, head): [score per counted trial]}``."""

    trials: dict[Head, list[float]]
    source: str = "<memory>"

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        """Read a ``{"layer-head": [scores]}`` file (the format of Wu et al. and RetMask)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise RetmaskError(f"score file {path} does not exist; run `retmask detect` first or fix the "
                               "path") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RetmaskError(f"score file {path} is not readable JSON ({err}); regenerate it with "
                               "`retmask detect`") from None
        if not isinstance(raw, dict) or not raw:
            raise RetmaskError(f"score file {path} is empty; expected {{\"layer-head\": [scores]}}")
        trials: dict[Head, list[float]] = {}
        for key, values in raw.items():
            head = _parse_key(key, path)
            if head in trials:
                raise RetmaskError(
                    f"score file {path}: head {head[0]}-{head[1]} appears twice (as {key!r}); keep one entry"
                )
            if _is_number(values):
                values = [values]
            if not isinstance(values, list):
                raise RetmaskError(f"score file {path}: entry {key!r} must be a list of numbers, got {_shown(values)}")
            trials[head] = _finite_scores(values, key, path)
        return cls(trials, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write the Wu JSON format, heads ordered by layer then head."""
        data = {f"{l}-{h}": self.trials[(l, h)] for l, h in sorted(self.trials)}
        Path(path).write_text(json.dumps(data) + "\n")

    @property
    def heads(self) -> list[Head]:
        return sorted(self.trials)

    def mean(self) -> dict[Head, float]:
        """Final head score: mean over counted trials (0.0 for a head with no counted trial)."""
        return {head: float(np.mean(v)) if v else 0.0 for head, v in self.trials.items()}

    def num_trials(self) -> int:
        """Number of counted trials behind the scores (the longest per-head list)."""
        return max((len(v) for v in self.trials.values()), default=0)

    def ranked(self) -> list[tuple[Head, float]]:
        """Heads by mean score, best first; ties broken by (layer, head) for determinism."""
        return sorted(self.mean().items(), key=lambda kv: (-kv[1], kv[0]))

    def check_shape(self, shape: ModelShape) -> None:
        """Refuse a score file written for a model of another shape."""
        for layer, head in self.trials:
            if layer >= shape.num_layers or head >= shape.num_heads:
                raise RetmaskError(
                    f"score file {self.source} has head {layer}-{head}, outside this model's "
                    f"{shape.num_layers} layers x {shape.num_heads} heads; use the score file detected for this model"
                )
        if len(self.trials) != shape.num_heads_total:
            raise RetmaskError(
                f"score file {self.source} has {len(self.trials)} heads but the model has "
                f"{shape.num_heads_total}; use the score file detected for this model"
            )

    def digest(self) -> str:
        """Content hash, recorded next to anything selected from these scores."""
        blob = json.dumps({f"{l}-{h}": v for (l, h), v in sorted(self.trials.items())}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def sparsity(self, threshold: float = 0.1) -> dict[str, float]:
        """How concentrated retrieval is: share above threshold, top-5% mass, Gini, normalized entropy."""
        values = np.array(sorted(self.mean().values()), dtype=np.float64)
        total = values.sum()
        n = len(values)
        top = max(1, int(round(0.05 * n)))
        if total > 0:
            p = values / total
            nz = p[p > 0]
            entropy = float(-(nz * np.log(nz)).sum() / np.log(n)) if n > 1 else 0.0
            gini = float((2 * np.arange(1, n + 1) - n - 1).dot(values) / (n * total))
            top_mass = float(values[-top:].sum() / total)
        else:
            entropy, gini, top_mass = 1.0, 0.0, 0.0
        return {
            "num_heads": n,
            "share_above_threshold": float((values > threshold).mean()) if n else 0.0,
            "top5pct_mass": top_mass,
            "gini": gini,
            "entropy": entropy,
            "max_score": float(values[-1]) if n else 0.0,
        }


def _parse_key(key: str, path: Path) -> Head:
    parts = key.split("-")
    # isascii: str.isdigit accepts digits such as '²' that int() refuses
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise RetmaskError(f"score file {path}: key {key!r} is not 'layer-head' (e.g. '17-3')")
    return int(parts[0]), int(parts[1])


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # JSON true/false are not scores


def _shown(value: object) -> str:
    """A value as it reads in the JSON file (NaN, Infinity, "0.5", true, null), cut to stay one line."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite_scores(values: list, key: str, path: Path) -> list[float]:
    # Python's json module accepts the non-standard literals NaN and Infinity (and 1e999 overflows to inf);
    # one such value would make every mean, rank and threshold comparison of that head meaningless.
    if not values:
        raise RetmaskError(
            f"score file {path}: head {key!r} has an empty score list; every head needs at least one counted "
            "trial: regenerate the file with `retmask detect`"
        )
    for i, v in enumerate(values):
        if not _is_number(v) or not math.isfinite(v):
            raise RetmaskError(
                f"score file {path}: head {key!r} score {i} is {_shown(v)}, not a finite number; "
                "fix that entry or regenerate the file with `retmask detect`"
            )
    return [float(v) for v in values]


# --- selection strategies, registered by name ---------------------------------------------------

SELECTORS: dict[str, Callable[..., list[Head]]] = {}


def _selector(name: str):
    def register(fn):
        SELECTORS[name] = fn
        return fn

    return register


def _check_k(scores: HeadScores, k: object) -> None:
    n = len(scores.trials)
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= n:
        raise RetmaskError(
            f"k must be a whole number from 1 to {n} (the heads in {scores.source}), got {_shown(k)}; "
            "pick k in that range"
        )


@_selector("threshold")
def select_threshold(scores: HeadScores, threshold: float = 0.1, **_) -> list[Head]:
    """Every head whose mean score is >= threshold (RetMask's default rule, t = 0.1)."""
    if not _is_number(threshold) or not math.isfinite(threshold) or threshold <= 0:
        raise RetmaskError(
            f"threshold must be a finite number above 0 (RetMask uses 0.1), got {_shown(threshold)}; "
            "a threshold of 0 or less would select every head"
        )
    return sorted(h for h, s in scores.ranked() if s >= threshold)


@_selector("top_k")
def select_top_k(scores: HeadScores, k: int = 5, **_) -> list[Head]:
    """The k best-scoring heads."""
    _check_k(scores, k)
    return sorted(h for h, _ in scores.ranked()[:k])


@_selector("random_nonretrieval")
def select_random_nonretrieval(scores: HeadScores, k: int = 5, seed: int = 0, exclude: list[Head] | None = None,
                               **_) -> list[Head]:
    """k random heads outside ``exclude`` (default: the top-k retrieval heads), seeded."""
    _check_k(scores, k)
    excluded = set(exclude if exclude is not None else select_top_k(scores, k=k))
    pool = [h for h in scores.heads if h not in excluded]
    if k > len(pool):
        raise RetmaskError(f"cannot draw {k} random heads: only {len(pool)} heads are outside the retrieval set")
    return sorted(random.Random(seed).sample(pool, k))


@_selector("random_all")
def select_random_all(scores: HeadScores, k: int = 5, seed: int = 0, **_) -> list[Head]:
    """k random heads from all heads, seeded."""
    _check_k(scores, k)
    return sorted(random.Random(seed).sample(scores.heads, k))


def select_heads(scores: HeadScores, strategy: str = "threshold", **kwargs) -> list[Head]:
    """Pick heads by a registered strategy (threshold, top_k, random_nonretrieval, random_all)."""
    if strategy not in SELECTORS:
        raise RetmaskError(f"unknown head selection {strategy!r}; choose one of {sorted(SELECTORS)}")
    for (layer, head), values in sorted(scores.trials.items()):
        if not values:  # a mean of 0.0 would stand in for "never measured" and rank the head silently
            raise RetmaskError(
                f"head {layer}-{head} in {scores.source} has no scores; every head needs at least one counted "
                "trial: regenerate the scores with `retmask detect`"
            )
    return SELECTORS[strategy](scores, **kwargs)
