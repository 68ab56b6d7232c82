"""Writing a generation output: ``open_run`` creates or resumes one, ``ShardWriter`` commits its shards.

Apart from the readers (``pipeline.shards``) because only the generation driver writes: trainers, export
and inspect read committed shards and never need the commit machinery.

A commit (the log's layout is in ``pipeline.commit_log``): the shard is written first (locally to
``data/.tmp-<uuid>.parquet``, then renamed; on object stores to its final name), then its record
``_log/<n>.json`` is created only if absent (locally a hard link of a complete temporary file; on object
stores one object write, visible whole or not at all, after an existence check), so two writers cannot
take the same commit number. Every ``CHECKPOINT_EVERY`` commits, and on ``close``, the records are folded
into ``manifest.json``. One writer per output directory: a lease in the manifest (host, pid) refuses a
second writer while the first lives. Reopening removes what an interrupted writer left behind.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.commit_log import LOG, _fold, _log_versions, _record_path
from pipeline.provenance import dataset_card
from pipeline.shard_schema import FORMAT, SCHEMA_VERSION, schema_for
from pipeline.shards import (
    DATA,
    MANIFEST,
    _committed_ids,
    _delete_quietly,
    _die,
    _fault,
    _lease,
    _listing,
    _now,
    _put,
    _sha256,
    _write_bytes,
    check_lease,
    check_manifest,
    check_same_run,
    load_manifest,
    normalized_config,
    output_fs,
)
from retrieval_heads.errors import RetmaskError, redact

log = logging.getLogger(__name__)

# A commit writes one small record; every CHECKPOINT_EVERY commits (and on close) the records are folded
# into manifest.json, so a commit costs the same at shard 10 and at shard 10,000.
CHECKPOINT_EVERY = int(os.environ.get("RETMASK_CHECKPOINT_EVERY", 100))


def _ids_hash(ids: Iterable[str]) -> str:
    return _sha256("\n".join(sorted(ids)).encode())


class ShardWriter:
    """Commits shards to one output directory; create it with ``open_run``.

    A commit is one small, numbered record (``_log/<n>.json``) naming the shard: created only if absent
    (a hard link of a complete temporary file locally; one object write after an existence check on object
    stores, where the writer lease guards the rest), so a second writer cannot take the same number.
    Every ``CHECKPOINT_EVERY`` commits and on ``close`` the records are folded into ``manifest.json``.
    """

    def __init__(self, out: str, fs: pafs.FileSystem, root: str, manifest: dict, committed: set[str]):
        # ``out`` is only shown to people: credentials in a URI never reach a message, the card or a log.
        self.out, self.fs, self.root = redact(out), fs, root
        self.manifest = {**manifest, "shards": list(manifest["shards"])}
        self.version = manifest.get("log_version", len(manifest["shards"]))
        self.schema = schema_for(manifest["variants"])
        self.committed_ids = committed
        self._lease_id: str | None = None

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    def write_shard(self, rows: Sequence[Mapping[str, Any]] | pa.Table) -> dict | None:
        """Commit ``rows`` as one shard; rows whose prompt id is already committed are skipped.

        Returns the manifest entry, or None if nothing was left to write.
        """
        table = self._table(rows)
        ids = table.column("prompt_id").to_pylist()
        if len(set(ids)) != len(ids):
            raise ValueError("write_shard got duplicate prompt_id values in one batch")
        fresh = [i for i, pid in enumerate(ids) if pid not in self.committed_ids]
        if not fresh:
            return None
        if len(fresh) < len(ids):
            log.warning("skipping %d rows already committed in %s", len(ids) - len(fresh), self.out)
            table, ids = table.take(pa.array(fresh, pa.int64())), [ids[i] for i in fresh]
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        key = uuid.uuid4().hex
        version = self.version + 1
        rel = f"{DATA}/part-{version - 1:05d}-{key[:8]}.parquet"
        entry = {"file": rel, "rows": len(ids), "sha256": _sha256(data), "prompt_ids_hash": _ids_hash(ids)}
        final, tmp = f"{self.root}/{rel}", f"{self.root}/{DATA}/.tmp-{key}.parquet"
        where = final
        try:
            if isinstance(self.fs, pafs.LocalFileSystem):
                _write_bytes(self.fs, tmp, data)
                self.fs.move(tmp, final)  # rename: atomic on a local filesystem
            else:  # no rename on object stores: the record below is the commit
                _write_bytes(self.fs, final, data)
            if _fault("shard_published"):
                _die()
            where = _record_path(self.root, version)
            self._commit_record(version, entry)
        except BaseException as err:  # including KeyboardInterrupt: never leave a half-made shard behind
            self._discard(tmp, final, rel, version)
            if isinstance(err, OSError):
                raise RetmaskError(
                    f"cannot write {redact(where)} ({redact(str(err))}); committed shards are intact: fix the storage "
                    "and rerun to resume"
                ) from None
            raise
        self.version = version
        self.manifest["shards"].append(entry)
        self.manifest["num_rows"] += len(ids)
        self.manifest["updated_at"] = _now()
        self.committed_ids.update(ids)
        if version % CHECKPOINT_EVERY == 0:
            self._checkpoint()
        return entry

    def _commit_record(self, version: int, entry: dict) -> None:
        """Create ``_log/<version>.json`` if and only if no other writer did: the commit."""
        path = _record_path(self.root, version)
        data = json.dumps({"version": version, "shard": entry, "writer": self._lease_id, "at": _now()}).encode()
        taken = RetmaskError(f"commit {version} of {self.out} was taken by another writer; only one writer may use "
                             "an output directory: stop the other one, then rerun to resume")
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{self.root}/{LOG}/.tmp-{uuid.uuid4().hex}.json"
            try:
                _write_bytes(self.fs, tmp, data)
                os.link(tmp, path)  # atomic create-if-absent of a complete file
            except FileExistsError:
                raise taken from None
            finally:
                _delete_quietly(self.fs, tmp)
        else:
            if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                raise taken
            _write_bytes(self.fs, path, data)

    def _checkpoint(self, release: bool = False) -> None:
        """Fold the commit records into manifest.json (still ours?), drop the folded records, refresh the card."""
        if _fault("checkpoint"):
            _die()
        on_disk = load_manifest(self.fs, self.root) or {}
        if (on_disk.get("writer") or {}).get("id") != self._lease_id:
            raise RetmaskError(f"{self.out}/{MANIFEST} was taken over by another writer; only one writer may use "
                               "an output directory")
        manifest = {**self.manifest, "log_version": self.version, "shards": list(self.manifest["shards"])}
        if release:
            manifest.pop("writer", None)
        else:
            manifest["writer"] = {**manifest["writer"], "heartbeat": manifest["updated_at"]}
        _put(self.fs, f"{self.root}/{MANIFEST}", _manifest_bytes(manifest))
        self.manifest = manifest
        for v in _log_versions(self.fs, self.root):
            if v <= self.version:  # folded; one delete each, no status check first (one request on S3, not two)
                try:
                    self.fs.delete_file(_record_path(self.root, v))
                except OSError as err:  # harmless: readers skip records the checkpoint already holds
                    log.warning("could not remove folded commit record %d (%s)", v, err)
        self._write_card()

    def close(self) -> None:
        """Fold every commit into manifest.json and release the writer lease (another process may reopen it)."""
        if self._lease_id is None:
            return
        try:
            self._checkpoint(release=True)
            self._lease_id = None
        except (OSError, RetmaskError) as err:
            log.warning("could not checkpoint %s and release its writer lease (%s); the commits are safe in %s/",
                        self.out, redact(str(err)), LOG)

    def discard_if_new(self) -> bool:
        """Remove the output this writer created if nothing was ever committed (no half-made output)."""
        if self.manifest["shards"] or len(self.manifest.get("sessions", [])) > 1:
            return False
        self._lease_id = None  # nothing left to release
        for rel in (MANIFEST, "README.md", "rejects.jsonl"):
            _delete_quietly(self.fs, f"{self.root}/{rel}")
        for root in (f"{self.root}/{LOG}", f"{self.root}/{DATA}", self.root):
            try:
                if not self.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
                    self.fs.delete_dir(root)
            except OSError:
                pass  # object stores have no directories; a leftover empty local dir is harmless
        return True

    def _table(self, rows: Sequence[Mapping[str, Any]] | pa.Table) -> pa.Table:
        if isinstance(rows, pa.Table):
            keys = set(rows.column_names)
        else:
            rows = list(rows)
            keys = set().union(*(r.keys() for r in rows)) if rows else set(self.schema.names)
        names = set(self.schema.names)
        if keys != names:  # strict: a misspelt variant column would otherwise become an all-null column
            missing, unexpected = sorted(names - keys), sorted(keys - names)
            raise ValueError(f"rows do not match the schema: missing {missing}, unexpected {unexpected}")
        if isinstance(rows, pa.Table):
            table = rows.select(self.schema.names).cast(self.schema)
        else:
            table = pa.Table.from_pylist(rows, schema=self.schema)
        if table.column("prompt_id").null_count:
            raise ValueError("write_shard got rows without prompt_id")
        return table.replace_schema_metadata(self.schema.metadata)

    def _discard(self, tmp: str, final: str, rel: str, version: int) -> None:
        """Remove what a failed commit left, unless its record made it a committed shard after all."""
        _delete_quietly(self.fs, tmp)
        try:
            with self.fs.open_input_stream(_record_path(self.root, version)) as f:
                committed = json.loads(f.read())["shard"]["file"] == rel
        except FileNotFoundError:
            committed = False
        except (OSError, ValueError, KeyError, TypeError):
            committed = True  # cannot tell: leave it; the next open_run removes it if it is unlisted
        if not committed:  # no record, or another writer's record under this number
            _delete_quietly(self.fs, final)

    def _write_card(self) -> None:
        try:
            _put(self.fs, f"{self.root}/README.md", dataset_card(self.manifest, self.out, self.schema).encode())
        except OSError as err:  # the data is committed; a stale card is not worth failing the run
            log.warning("could not update the dataset card in %s (%s)", self.out, err)


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()


def open_run(
    out: str | Path,
    run_config: Mapping[str, Any],
    variants: Sequence[str],
    *,
    filesystem: pafs.FileSystem | None = None,
) -> ShardWriter:
    """Create an output directory, or reopen one made with the same run config to resume it.

    ``run_config`` holds what decides the outputs: ``model`` (``id``, ``path``, ``hash``), ``masks``
    (head lists and the score file's hash), ``sampling``, ``seed`` and ``packages``; the
    ``IDENTITY_KEYS`` must match on resume. Leftover temporary and unlisted shard files are removed.
    """
    schema_for(variants)  # validates the names before anything touches storage
    fs, root = output_fs(out, filesystem)
    out, config = str(out), normalized_config(run_config)
    try:
        fs.create_dir(f"{root}/{DATA}", recursive=True)
        fs.create_dir(f"{root}/{LOG}", recursive=True)
        manifest = load_manifest(fs, root)
        if manifest is None:
            names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root))} - {DATA, LOG}
            names |= set(_listing(fs, root))
            if any(not n.startswith(".tmp-") for n in names):
                raise RetmaskError(
                    f"{redact(out)} already holds files but no {MANIFEST}; use an empty or new output directory")
            manifest = {
                "format": FORMAT, "schema_version": SCHEMA_VERSION, "variants": list(variants), "run_config": config,
                "created_at": _now(), "updated_at": _now(), "num_rows": 0, "shards": [], "log_version": 0,
                "sessions": [],
            }
        else:
            check_manifest(manifest, f"{redact(out)}/{MANIFEST}")
            check_same_run(redact(out), manifest, config, list(variants))
            manifest = _fold(fs, root, manifest)
            check_lease(redact(out), manifest.get("writer"), manifest.get("updated_at"))
        _remove_orphans(fs, root, {s["file"] for s in manifest["shards"]})
        session = {"started_at": _now(), "packages": config.get("packages")}  # versions may drift across resumes
        manifest = {**manifest, "sessions": [*manifest.get("sessions", []), session]}
        lease = _lease()
        manifest["writer"] = lease
        manifest["log_version"] = manifest.get("log_version", len(manifest["shards"]))
        _put(fs, f"{root}/{MANIFEST}", _manifest_bytes(manifest))  # also proves the location is writable
        for v in _log_versions(fs, root):  # folded into the manifest just written (and anything after a gap)
            _delete_quietly(fs, _record_path(root, v))
    except OSError as err:
        raise RetmaskError(
            f"cannot write to output directory {redact(out)} ({redact(str(err))}); pick a writable location") from None
    writer = ShardWriter(out, fs, root, manifest, _committed_ids(fs, root, manifest))
    writer._lease_id = lease["id"]
    writer._write_card()
    if manifest["shards"]:
        log.info("resuming %s: %d rows in %d shards already committed", out, writer.num_rows, len(manifest["shards"]))
    return writer


def _remove_orphans(fs: pafs.FileSystem, root: str, listed: set[str]) -> None:
    """Delete temp files and shards no manifest lists: what a killed writer leaves behind."""
    names = [f"{DATA}/{n}" for n in _listing(fs, root)]
    names += [f"{LOG}/{n}" for n in _listing(fs, root, LOG) if n.startswith(".tmp-")]
    names += [i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File]
    for rel in names:
        base = rel.rsplit("/", 1)[-1]
        orphan = base.startswith(".tmp-") or (rel.startswith(f"{DATA}/part-") and rel not in listed)
        if orphan:
            log.warning("removing %s/%s left by an interrupted writer", root, rel)
            fs.delete_file(f"{root}/{rel}")
