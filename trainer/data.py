"""Shard directory -> TRL conversational preference pairs, with the pair filters and a held-out split.

Generation keeps every raw output (``pipeline.shards``); what counts as a usable pair is decided here, at
read time, and every removal is counted so a run can say what it threw away:

    empty       either side (or the prompt) has no text: missing or whitespace only
    identical   chosen and rejected texts are equal (no preference signal)
    truncated   either side stopped at the token limit (``finish_reason == "length"``), when dropped
    too_long    either side has more than ``max_response_tokens`` tokens, when that limit is set

Each pair is counted by the first filter that removes it, in that order. The eval split is decided by a
hash of the prompt id alone, so the same prompts are held out whatever variants are paired (the
``random_masked`` control is evaluated on the same prompts as ``retrieval_masked``).

``stats["pairs_digest"]`` identifies the pairs read: a hash of the committed shards' checksums in manifest
order (``pairs_digest``), so a moved or copied directory keeps its identity and any added, removed or
rewritten shard changes it. The trainer records it and refuses to resume a run on different pairs.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from pipeline.shards import output_fs, read_manifest, read_pairs_table
from retrieval_heads.errors import RetmaskError

log = logging.getLogger(__name__)

SUPPORTED_FORMAT = "retmask-pairs"
SUPPORTED_SCHEMA_VERSIONS = (1,)
FILTERS = ("empty", "identical", "truncated", "too_long")


@dataclass
class Pairs:
    """Train and held-out pairs in TRL's conversational preference format, and what the filters did."""

    train: Dataset
    eval: Dataset | None
    stats: dict = field(default_factory=dict)


_COPY = re.compile(r"~\d+$")  # the copy suffix of pipeline.prompts.REPEAT_SEP


def eval_bucket(prompt_id: str) -> float:
    """A prompt id's fixed position in [0, 1): ids below ``eval_fraction`` are held out.

    Copies of one prompt (``prompt_options.repeats``: ids ``<id>~1``, ``<id>~2``, ...) share their base id's
    position, so a prompt is never trained on under one id and held out under another.
    """
    digest = hashlib.sha256(f"retmask-split:{_COPY.sub('', prompt_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pairs_digest(manifest: dict) -> str:
    """Identity of a pair directory's content: sha256 over its committed shards' sha256 list, in order.

    Volatile manifest fields (``updated_at``, ``sessions``, paths) stay out, so resuming generation without
    committing anything, or moving the directory, keeps the digest.
    """
    shards = manifest.get("shards", [])
    # every manifest since schema version 1 records a shard's sha256; the file name stands in otherwise
    lines = [str(s.get("sha256") or s.get("file")) for s in shards]
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_pairs(
    shards_dir: str | Path,
    chosen: str = "normal",
    rejected: str = "retrieval_masked",
    *,
    drop_truncated: bool = True,
    max_response_tokens: int | None = None,
    eval_fraction: float = 0.05,
    max_length: int | None = None,
) -> Pairs:
    """Read the manifest-listed shards of ``shards_dir`` as filtered chosen/rejected pairs.

    ``max_length`` (the trainer's prompt+response token limit) removes nothing: pairs that exceed it are
    only counted (``stats["over_max_length"]``), because TRL truncates them silently (docs/METHOD.md
    pitfall 7), and ``stats["prompt_over_max_length"]`` counts those whose prompt alone fills it, which TRL
    drops.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise RetmaskError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    table, manifest = read_pair_table(shards_dir, chosen, rejected)
    rows = table.to_pylist()
    kept, removed = filter_pairs(rows, chosen, rejected, shards_dir, drop_truncated=drop_truncated,
                                 max_response_tokens=max_response_tokens)
    stats = {
        "shards_dir": str(shards_dir), "pairs_digest": pairs_digest(manifest),
        "shards": len(manifest.get("shards", [])), "chosen": chosen, "rejected": rejected, "rows": len(rows),
        "removed": removed, "pairs": len(kept),
    }
    if max_length is not None:
        stats["max_length"] = max_length
        stats["over_max_length"] = sum(1 for r in kept if _pair_tokens(r, chosen, rejected) > max_length)
        # TRL drops these outright: truncation would leave no response token to learn from
        stats["prompt_over_max_length"] = sum(1 for r in kept if (r["num_prompt_tokens"] or 0) >= max_length)
    train_rows, eval_rows = [], []
    for row in kept:
        (eval_rows if eval_bucket(row["prompt_id"]) < eval_fraction else train_rows).append(row)
    if not train_rows:
        raise RetmaskError(
            f"all {len(kept)} pairs in {shards_dir} fell into the eval split (eval_fraction {eval_fraction}); lower it"
        )
    if eval_fraction > 0 and not eval_rows:
        log.warning("no pair of %d fell into the eval split (eval_fraction %s); training without eval", len(kept),
                    eval_fraction)
    stats.update(train=len(train_rows), eval=len(eval_rows), eval_fraction=eval_fraction)
    log.info("pairs from %s: %d rows, %d kept (%d train, %d eval); removed %s",
             shards_dir, len(rows), len(kept), len(train_rows), len(eval_rows), removed)
    return Pairs(
        train=_to_dataset(train_rows, chosen, rejected),
        eval=_to_dataset(eval_rows, chosen, rejected) if eval_rows else None,
        stats=stats,
    )


def read_pair_table(shards_dir: str | Path, chosen: str, rejected: str) -> tuple[pa.Table, dict]:
    """The columns a chosen/rejected pair needs from every committed shard (verified), and the manifest."""
    if chosen == rejected:
        raise RetmaskError(f"chosen and rejected are both {chosen!r}; pick two different variants")
    manifest = read_manifest(shards_dir)  # RetmaskError when the directory has no manifest
    fmt, version = manifest.get("format"), manifest.get("schema_version")
    if fmt != SUPPORTED_FORMAT or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise RetmaskError(
            f"{shards_dir} is {fmt} schema version {version}; this trainer reads {SUPPORTED_FORMAT} "
            f"versions {list(SUPPORTED_SCHEMA_VERSIONS)}: regenerate it or upgrade retmask"
        )
    variants = manifest.get("variants", [])
    missing = [v for v in (chosen, rejected) if v not in variants]
    if missing:
        raise RetmaskError(
            f"variant(s) {missing} not in {shards_dir}; it holds {variants}: pick --chosen/--rejected from those"
        )
    columns = ["prompt_id", "prompt", "num_prompt_tokens"]
    columns += [f"{v}__{name}" for v in (chosen, rejected) for name in ("text", "num_tokens", "finish_reason")]
    fs, root = output_fs(shards_dir)
    for shard in manifest.get("shards", []):
        path = f"{root}/{shard['file']}"
        try:
            with fs.open_input_file(path) as f:
                names = set(pq.read_schema(f).names)
        except (OSError, pa.ArrowException) as err:
            raise RetmaskError(f"shard {path} is unreadable ({err}); run `retmask inspect` on {shards_dir}") from None
        absent = [c for c in columns if c not in names]
        if absent:
            raise RetmaskError(f"shard {path} lacks columns {absent}; it does not follow the pair schema "
                               "(run `retmask inspect`)")
    return read_pairs_table(shards_dir, columns=columns), manifest


def filter_pairs(
    rows: list[dict], chosen: str, rejected: str, where: str | Path, *,
    drop_truncated: bool = True, max_response_tokens: int | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Rows that make usable pairs, and how many each filter removed (``FILTERS`` order, first match counts).

    The one implementation of the pair filters: ``load_pairs`` (training) and ``pipeline.export``
    (pairs for other trainers) keep exactly the same pairs. No pair left is a user error naming the counts.
    """
    removed = dict.fromkeys(FILTERS, 0)
    kept = []
    for row in rows:
        reason = _rejection(row, chosen, rejected, drop_truncated, max_response_tokens)
        if reason:
            removed[reason] += 1
        else:
            kept.append(row)
    if not kept:
        counts = ", ".join(f"{k} {v}" for k, v in removed.items())
        raise RetmaskError(
            f"no {chosen}/{rejected} pairs left in {where} after filtering {len(rows)} rows "
            f"(removed: {counts}); check the generation run with `retmask inspect`"
        )
    return kept, removed


def _rejection(row: dict, chosen: str, rejected: str, drop_truncated: bool, max_tokens: int | None) -> str | None:
    texts = [row[f"{v}__text"] for v in (chosen, rejected)]
    if any(t is None or not t.strip() for t in [row["prompt"], *texts]):
        return "empty"
    if texts[0] == texts[1]:
        return "identical"
    if drop_truncated and any(row[f"{v}__finish_reason"] == "length" for v in (chosen, rejected)):
        return "truncated"
    if max_tokens is not None and any((row[f"{v}__num_tokens"] or 0) > max_tokens for v in (chosen, rejected)):
        return "too_long"
    return None


def _pair_tokens(row: dict, chosen: str, rejected: str) -> int:
    # num_prompt_tokens already includes the chat template, so this is what the trainer's sequence holds
    longest = max(row[f"{chosen}__num_tokens"] or 0, row[f"{rejected}__num_tokens"] or 0)
    return (row["num_prompt_tokens"] or 0) + longest


def _to_dataset(rows: list[dict], chosen: str, rejected: str) -> Dataset:
    # Conversational format: TRL applies the model's chat template, so no template text is stored here.
    return Dataset.from_dict({
        "prompt_id": [r["prompt_id"] for r in rows],
        "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
        "chosen": [[{"role": "assistant", "content": r[f"{chosen}__text"]}] for r in rows],
        "rejected": [[{"role": "assistant", "content": r[f"{rejected}__text"]}] for r in rows],
    })
