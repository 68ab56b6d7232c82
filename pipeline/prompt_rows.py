"""What a prompt is, and how one source row becomes a ``Prompt`` or a ``Reject``.

Below both the readers (``pipeline.prompt_sources``) and the stream (``pipeline.prompts``), which both
handle these two types. A prompt's id is its row's id field when it has one, else ``prompt_id`` of its
text, so ids are stable across runs and machines. A row without usable text (missing, not a string,
empty), and an LMSYS record flagged in its source, is a ``Reject`` whose reason reads ``"kind: detail"``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Prompt:
    """One user turn to generate from; ``id`` is stable across runs (source id or content hash)."""

    id: str
    text: str
    meta: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Reject:
    """A source row that is not a usable prompt; ``reason`` reads ``"kind: detail"``."""

    row: Any
    reason: str

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


_MISSING = object()


def prompt_id(text: str) -> str:
    """Content id of a prompt text: ``sha1-`` + the first 16 hex digits of its SHA-1."""
    return "sha1-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _make(row: Any, text: Any, raw_id: Any, field: str, meta: Mapping[str, Any] | None) -> Prompt | Reject:
    if text is _MISSING or text is None:
        return Reject(row, f"missing field: {field!r}")
    if not isinstance(text, str):
        return Reject(row, f"not a string: {field!r} is {type(text).__name__}")
    if not text.strip():
        return Reject(row, "empty text")
    pid = prompt_id(text) if raw_id is None or raw_id == "" else str(raw_id)
    return Prompt(pid, text, meta)


def _from_record(row: Any, text_field: str, id_field: str | None, meta: Mapping[str, Any]) -> Prompt | Reject:
    if not isinstance(row, dict):
        return Reject(row, f"not an object: {type(row).__name__}")
    raw_id = row.get(id_field) if id_field else None
    return _make(row, row.get(text_field, _MISSING), raw_id, text_field, meta)


def _first_user_turn(
    row: Any, conversation_field: str, id_field: str | None, skip_flags: Sequence[str], meta_base: Mapping[str, Any]
) -> Prompt | Reject:
    if not isinstance(row, dict):
        return Reject(row, f"not an object: {type(row).__name__}")
    flag = next((f for f in skip_flags if row.get(f) not in (None, False, "")), None)
    if flag:
        return Reject(row, f"{flag}: flagged in the source")
    conversation = row.get(conversation_field, _MISSING)
    if conversation is _MISSING or conversation is None:
        return Reject(row, f"missing field: {conversation_field!r}")
    if not isinstance(conversation, list):
        return Reject(row, f"malformed conversation: {type(conversation).__name__}, not a list of turns")
    turn = next((t for t in conversation if isinstance(t, dict) and t.get("role") == "user"), None)
    if turn is None:
        return Reject(row, "no user turn")
    meta = dict(meta_base)
    for key in ("conversation_id", "language", "model"):
        if row.get(key) is not None:
            meta[key] = row[key]
    raw_id = row.get(id_field) if id_field else None
    return _make(row, turn.get("content", _MISSING), raw_id, f"{conversation_field}[user].content", meta)
