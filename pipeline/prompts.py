"""Prompts for a run, by source name: validated, de-duplicated by id, streamed in batches.

``load_prompts(name, path, **options)`` opens a source registered in ``pipeline.prompt_sources``
(``jsonl``, ``parquet``, ``hf_dataset``, ``lmsys``, ``builtin``, with their options) and returns a
single-pass ``PromptStream`` of ``list[Prompt]`` batches. Ids come from the source's id field when it has
one, else from the text (``sha1-`` + 16 hex), so they are stable across runs and machines; the first
prompt with a given id wins. Bad rows become ``Reject`` records, never exceptions; checks such as
``token_limit`` reject more. A file that cannot be read as its source's format is a user error.

The option ``repeats=N`` (any source) yields every valid prompt N times in a row, copy k under the id
``f"{id}~{k}"``: the per-prompt sampling seed is derived from the id, so the copies sample independently,
and resuming by committed ids skips exactly the copies already written. It lives in the stream, not in the
sources, so every source gets it; a rejected row is counted once and yields no copy.

This module is what a run sees of its prompts, the same for every source; the formats live in
``pipeline.prompt_sources``, the ``Prompt`` and ``Reject`` types in ``pipeline.prompt_rows``.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

from pipeline.prompt_rows import Prompt, Reject
from pipeline.prompt_sources import SOURCES
from retrieval_heads.errors import RetmaskError

log = logging.getLogger(__name__)

Check = Callable[[Prompt], "str | None"]  # returns a reject reason, or None to keep the prompt
MAX_KEPT_REJECTS = 1000  # counts are exact; only the first rejects keep their rows, to bound memory
REPEAT_SEP = "~"  # copy k of prompt ``id`` is ``f"{id}~{k}"``


def check_repeats(repeats: Any) -> int:
    """The ``repeats`` prompt option, refused in one line unless it is a whole number >= 1."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise RetmaskError(f"prompt_options.repeats must be a whole number >= 1 (how many times each prompt is "
                           f"used), got {repeats!r}")
    return repeats


def token_limit(count_tokens: Callable[[str], int], max_tokens: int) -> Check:
    """A check rejecting prompts longer than ``max_tokens`` as counted by ``count_tokens``."""

    def check(prompt: Prompt) -> str | None:
        n = count_tokens(prompt.text)
        return f"too long: {n} tokens > {max_tokens}" if n > max_tokens else None

    return check


class PromptStream:
    """Single-pass iterable of ``list[Prompt]`` batches; rejects are recorded while iterating.

    Counts: ``num_rows`` source rows read, ``num_prompts`` prompt instances yielded (``repeats`` copies
    included), ``num_skipped`` instances skipped by id, ``reject_counts`` rejected rows by kind.
    """

    def __init__(
        self, items: Iterator[list], batch_size: int, checks: Sequence[Check], skip_ids: Collection[str],
        repeats: int = 1,
    ):
        self._items, self._batch_size, self._checks, self._skip = items, batch_size, list(checks), skip_ids
        self.repeats = check_repeats(repeats)
        self.rejects: list[Reject] = []
        self.reject_counts: Counter[str] = Counter()
        self.num_rows = 0
        self.num_prompts = 0
        self.num_skipped = 0  # prompts whose id is in ``skip_ids`` (e.g. already committed on resume)
        self._started = False

    def _reject(self, reject: Reject) -> None:
        self.reject_counts[reject.kind] += 1
        if len(self.rejects) < MAX_KEPT_REJECTS:
            self.rejects.append(reject)

    def _copies(self, prompt: Prompt) -> list[Prompt]:
        extra = [replace(prompt, id=f"{prompt.id}{REPEAT_SEP}{k}") for k in range(1, self.repeats)]
        return [prompt, *extra]

    def __iter__(self) -> Iterator[list[Prompt]]:
        if self._started:
            raise RuntimeError("a PromptStream is single-pass; call load_prompts again to re-read the source")
        self._started = True
        seen: set[str] = set()
        batch: list[Prompt] = []
        for items in self._items:
            for item in items:
                self.num_rows += 1
                if isinstance(item, Reject):
                    self._reject(item)
                    continue
                copies = self._copies(item)
                # a row whose id (or a copy's id) was taken by an earlier row is a duplicate, as a whole
                taken = next((c.id for c in copies if c.id in seen), None)
                if taken is not None:
                    self._reject(Reject(item, f"duplicate id: {taken}"))
                    continue
                seen.update(c.id for c in copies)
                todo = [c for c in copies if c.id not in self._skip]
                self.num_skipped += len(copies) - len(todo)
                if not todo:
                    continue
                reason = next((r for r in (check(item) for check in self._checks) if r), None)
                if reason:
                    self._reject(Reject(item, reason))
                    continue
                for prompt in todo:
                    batch.append(prompt)
                    if len(batch) == self._batch_size:
                        self.num_prompts += len(batch)
                        yield batch
                        batch = []
        if batch:
            self.num_prompts += len(batch)
            yield batch
        if self.reject_counts:
            log.warning("rejected %d prompt rows: %s", sum(self.reject_counts.values()), dict(self.reject_counts))


def load_prompts(
    source: str,
    path: str | Path | None = None,
    *,
    batch_size: int = 256,
    checks: Sequence[Check] = (),
    skip_ids: Collection[str] = frozenset(),
    repeats: Any = 1,
    **options: Any,
) -> PromptStream:
    """Open a registered prompt source; iterate the result for ``list[Prompt]`` batches.

    ``repeats`` is the one option of every source (the stream's, see the module docstring); the other
    ``options`` are the source's own.
    """
    if source not in SOURCES:
        raise RetmaskError(f"unknown prompt source {source!r}; registered sources: {', '.join(sorted(SOURCES))}")
    if batch_size < 1:
        raise RetmaskError(f"batch_size must be >= 1, got {batch_size}")
    repeats = check_repeats(repeats)  # before the source opens its files
    fn = SOURCES[source]
    try:
        inspect.signature(fn).bind(path, batch_size=batch_size, **options)
    except TypeError as err:
        raise RetmaskError(f"prompt source {source!r}: {err}") from None
    items = fn(path, batch_size=batch_size, **options)  # sources check their path here, not on first batch
    return PromptStream(items, batch_size, checks, skip_ids, repeats)
