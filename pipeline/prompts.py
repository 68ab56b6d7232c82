"""Prompts for a run, by source name: validated, de-duplicated by id, streamed in batches.

``load_prompts(name, path, **options)`` opens a source registered in ``pipeline.prompt_sources``
(``jsonl``, ``parquet``, ``hf_dataset``, ``lmsys``, ``builtin``, with their options) and returns a
single-pass ``PromptStream`` of ``list[Prompt]`` batches. Ids come from the source's id field when it has
one, else from the text (``sha1-`` + 16 hex), so they are stable across runs and machines; the first
prompt with a given id wins. Bad rows become ``Reject`` records, never exceptions; checks such as
``token_limit`` reject more. A file that cannot be read as its source's format is a user error.

This module is what a run sees of its prompts, the same for every source; the formats live in
``pipeline.prompt_sources``, the ``Prompt`` and ``Reject`` types in ``pipeline.prompt_rows``.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

from pipeline.prompt_rows import Prompt, Reject
from pipeline.prompt_sources import SOURCES
from retrieval_heads.errors import RetmaskError

log = logging.getLogger(__name__)

Check = Callable[[Prompt], "str | None"]  # returns a reject reason, or None to keep the prompt
MAX_KEPT_REJECTS = 1000  # counts are exact; only the first rejects keep their rows, to bound memory


def token_limit(count_tokens: Callable[[str], int], max_tokens: int) -> Check:
    """A check rejecting prompts longer than ``max_tokens`` as counted by ``count_tokens``."""

    def check(prompt: Prompt) -> str | None:
        n = count_tokens(prompt.text)
        return f"too long: {n} tokens > {max_tokens}" if n > max_tokens else None

    return check


class PromptStream:
    """Single-pass iterable of ``list[Prompt]`` batches; rejects are recorded while iterating."""

    def __init__(self, items: Iterator[list], batch_size: int, checks: Sequence[Check], skip_ids: Collection[str]):
        self._items, self._batch_size, self._checks, self._skip = items, batch_size, list(checks), skip_ids
        self.rejects: list[Reject] = []
        self.reject_counts: Counter[str] = Counter()
        self.num_prompts = 0
        self.num_skipped = 0  # prompts whose id is in ``skip_ids`` (e.g. already committed on resume)
        self._started = False

    def _reject(self, reject: Reject) -> None:
        self.reject_counts[reject.kind] += 1
        if len(self.rejects) < MAX_KEPT_REJECTS:
            self.rejects.append(reject)

    def __iter__(self) -> Iterator[list[Prompt]]:
        if self._started:
            raise RuntimeError("a PromptStream is single-pass; call load_prompts again to re-read the source")
        self._started = True
        seen: set[str] = set()
        batch: list[Prompt] = []
        for items in self._items:
            for item in items:
                if isinstance(item, Reject):
                    self._reject(item)
                    continue
                if item.id in seen:
                    self._reject(Reject(item, f"duplicate id: {item.id}"))
                    continue
                seen.add(item.id)
                if item.id in self._skip:
                    self.num_skipped += 1
                    continue
                reason = next((r for r in (check(item) for check in self._checks) if r), None)
                if reason:
                    self._reject(Reject(item, reason))
                    continue
                batch.append(item)
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
    **options: Any,
) -> PromptStream:
    """Open a registered prompt source; iterate the result for ``list[Prompt]`` batches."""
    if source not in SOURCES:
        raise RetmaskError(f"unknown prompt source {source!r}; registered sources: {', '.join(sorted(SOURCES))}")
    if batch_size < 1:
        raise RetmaskError(f"batch_size must be >= 1, got {batch_size}")
    fn = SOURCES[source]
    try:
        inspect.signature(fn).bind(path, batch_size=batch_size, **options)
    except TypeError as err:
        raise RetmaskError(f"prompt source {source!r}: {err}") from None
    items = fn(path, batch_size=batch_size, **options)  # sources check their path here, not on first batch
    return PromptStream(items, batch_size, checks, skip_ids)
