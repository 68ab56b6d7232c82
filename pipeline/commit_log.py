"""The commit log of an output directory: which shards are committed, at constant cost per commit.

A shard counts only once a commit record names it (after Delta Lake's log), and readers read committed
shards only::

    data/part-00041-1a2b3c4d.parquet   written first (locally to data/.tmp-<uuid>.parquet, then renamed)
    _log/00000000000000000042.json     the commit: {"version": 42, "shard": {file, rows, sha256, ...}}
    manifest.json                      checkpoint: every shard up to ``log_version``, the run config, lease

A commit writes one small record instead of rewriting a manifest listing every shard, so it costs the same
at shard 10 and at shard 10,000. Every ``CHECKPOINT_EVERY`` commits, and when the writer closes, the
records are folded into ``manifest.json`` and removed (``pipeline.shard_writer``); readers fold
``manifest.json`` plus the records after it (``_fold``). A finished run therefore has a complete
``manifest.json`` and an empty ``_log/``, as schema-v1 outputs (which have no log) always had.

This module is the log's layout and how it is read; the readers (``pipeline.shards``) and the writer
(``pipeline.shard_writer``) both build on it.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from retrieval_heads.errors import RetmaskError, redact

LOG = "_log"


def _log_versions(fs: pafs.FileSystem, root: str) -> list[int]:
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{LOG}", allow_not_found=True))
    versions = []
    for info in infos:
        stem = info.base_name.removesuffix(".json")
        if info.type == pafs.FileType.File and info.base_name.endswith(".json") and stem.isdigit():
            versions.append(int(stem))
    return sorted(versions)


def _record_path(root: str, version: int) -> str:
    return f"{root}/{LOG}/{version:020d}.json"


def _fold(fs: pafs.FileSystem, root: str, manifest: dict) -> dict:
    """manifest.json (the last checkpoint) plus the commit records after it, in order: the committed state."""
    base = manifest.get("log_version", len(manifest["shards"]))  # schema-v1 outputs have no log
    shards, version, updated = list(manifest["shards"]), base, manifest.get("updated_at")
    for v in _log_versions(fs, root):
        if v <= base:
            continue  # folded already (a checkpoint whose clean-up was interrupted)
        if v != version + 1:
            break  # records are written in order by one writer: nothing after a gap was committed
        try:
            with fs.open_input_stream(_record_path(root, v)) as f:
                record = json.loads(f.read())
            shard = record["shard"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RetmaskError(f"commit record {redact(_record_path(root, v))} is unreadable ({err}); "
                               "restore it or move the output aside and regenerate") from None
        shards.append(shard)
        version, updated = v, record.get("at", updated)
    folded = {**manifest, "shards": shards, "log_version": version, "updated_at": updated}
    folded["num_rows"] = sum(s["rows"] for s in shards)
    return folded
