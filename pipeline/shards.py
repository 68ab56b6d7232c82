"""Reading a generation output: its location, manifest, verified shards, and the checks a resume makes.

An output directory (a local path or a URI such as ``s3://bucket/prefix``, through ``pyarrow.fs``)::

    manifest.json                      what is committed, and the run config that made it
    README.md                          dataset card
    _log/00000000000000000042.json     commits not yet folded into manifest.json (``pipeline.commit_log``)
    data/part-00000-1a2b3c4d.parquet   shards (rows as in ``pipeline.shard_schema``)

Apart from the writer (``pipeline.shard_writer``) because most users only read: trainers, export, inspect
and ``retmask plan``. Readers read committed shards only, each verified against its manifest entry
(checksum, row count), so an altered or half-written shard is never read as whole. Here too are what the
writer shares with them: the storage primitives (the one place bytes reach storage, atomic small-file
replace, fault-injection points) and the checks a resume makes before writing (same run, writer lease),
which ``retmask plan`` runs without writing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.commit_log import _fold
from pipeline.shard_schema import FORMAT, IDENTITY_KEYS, SCHEMA_VERSION, schema_for
from retrieval_heads.errors import RetmaskError, redact

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATA = "data"
# Fault injection for the crash tests: RETMASK_FAULT_KILL_AT=<point>[:<nth>] SIGKILLs this process at the
# nth time it reaches <point> (default the first): ``shard_published`` (shard in place, manifest not yet
# written) or ``manifest_write`` (half of the new manifest written to its temporary file).
FAULT_ENV = "RETMASK_FAULT_KILL_AT"
# A writer that stopped without releasing its lease (kill -9, lost node) blocks a second writer on
# another host for this long after its last commit; on the same host a dead pid frees it at once.
LEASE_SECONDS = float(os.environ.get("RETMASK_LEASE_SECONDS", 1800))
_ABSENT = "<absent>"


# ---------------------------------------------------------------------------------------------------
# storage helpers


def output_fs(out: str | Path, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, root path)`` of an output location; ``filesystem`` overrides URI resolution."""
    out = str(out)
    if filesystem is not None:
        return filesystem, out.rstrip("/")
    if "://" not in out:
        return pafs.LocalFileSystem(), os.path.abspath(out)
    try:
        fs, path = pafs.FileSystem.from_uri(out)
    except (pa.ArrowInvalid, OSError) as err:
        raise RetmaskError(f"cannot open output location {redact(out)} ({redact(str(err))})") from None
    return fs, path.rstrip("/")


_fault_hits: dict[str, int] = {}


def _fault(point: str) -> bool:
    """True when ``$RETMASK_FAULT_KILL_AT`` asks to die at this visit of ``point`` (tests only)."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, nth = spec.partition(":")
    if name != point:
        return False
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    return _fault_hits[point] == int(nth or 1)


def _die() -> None:
    import signal

    log.warning("fault injection (%s): SIGKILL", os.environ.get(FAULT_ENV))
    os.kill(os.getpid(), signal.SIGKILL)


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """The one place bytes reach storage (tests inject disk errors and crashes here).

    Tests patch the name where the caller looks it up: ``pipeline.shard_writer`` for shards and commit
    records, this module for manifests and the card (``_put``).
    """
    with fs.open_output_stream(path) as f:
        if path.endswith(f"-{MANIFEST}") and "/.tmp-" in path and _fault("manifest_write"):
            f.write(memoryview(data)[: len(data) // 2])
            f.flush()
            _die()
        f.write(data)
    if isinstance(fs, pafs.LocalFileSystem):
        # flush to disk before the rename publishes the file, so a power loss cannot leave it empty
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Replace a small file atomically: temp + rename locally; one object write on object stores, which
    readers see whole or not at all (pyarrow uploads even small objects as one multipart upload)."""
    if isinstance(fs, pafs.LocalFileSystem):
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            _write_bytes(fs, tmp, data)
            fs.move(tmp, path)
        finally:
            _delete_quietly(fs, tmp)
    else:
        _write_bytes(fs, path, data)


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as err:
        log.warning("could not remove %s (%s)", path, err)


def _listing(fs: pafs.FileSystem, root: str, folder: str = DATA) -> list[str]:
    """File names directly under ``root/data`` (or another folder)."""
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", allow_not_found=True))
    return [i.base_name for i in infos if i.type == pafs.FileType.File]


# ---------------------------------------------------------------------------------------------------
# the manifest and verified reads


def load_manifest(fs: pafs.FileSystem, root: str) -> dict | None:
    """manifest.json as written (None if there is none), before the shape check and the commit-log fold that
    ``read_manifest`` adds: what a writer and ``retmask plan`` compare a new run against."""
    path = f"{root}/{MANIFEST}"
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as err:
        raise RetmaskError(f"cannot read {redact(path)} ({redact(str(err))}); restore it or use a new output "
                           "directory") from None


def read_manifest(out: str | Path, filesystem: pafs.FileSystem | None = None) -> dict:
    """The manifest of an output directory (RetmaskError if it has none or it is not a retmask manifest)."""
    fs, root = output_fs(out, filesystem)
    manifest = load_manifest(fs, root)
    if manifest is None:
        raise RetmaskError(f"{redact(str(out))} has no {MANIFEST}; it is not a retmask output directory "
                           "(run `retmask generate`)")
    check_manifest(manifest, f"{redact(str(out))}/{MANIFEST}")
    return _fold(fs, root, manifest)


def committed_files(out: str | Path, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Paths of exactly the committed shards, e.g. for ``load_dataset("parquet", data_files=...)`` mid-run."""
    fs, root = output_fs(out, filesystem)
    base = str(out).split("?", 1)[0].rstrip("/") if "://" in str(out) else root
    return [f"{base}/{s['file']}" for s in read_manifest(out, filesystem)["shards"]]


def check_manifest(manifest: Any, where: str) -> None:
    """Refuse a manifest of the wrong shape with one line naming the field (not a KeyError later)."""
    def bad(what: str) -> RetmaskError:
        return RetmaskError(f"{where}: {what}; it is not a retmask manifest: restore it or use a new output directory")

    if not isinstance(manifest, dict):
        raise bad(f"holds a {type(manifest).__name__}, expected an object")
    expected = (("format", str), ("schema_version", int), ("variants", list), ("run_config", dict), ("shards", list))
    for key, typ in expected:
        if not isinstance(manifest.get(key), typ):
            raise bad(f"field {key!r} is {json.dumps(manifest.get(key), default=str)[:60]}, expected {typ.__name__}")
    if not all(isinstance(v, str) for v in manifest["variants"]):
        raise bad("field 'variants' must list variant names")
    for i, entry in enumerate(manifest["shards"]):
        fields = (("file", str), ("rows", int), ("sha256", str))
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), t) for k, t in fields):
            raise bad(f"shards[{i}] must hold file (str), rows (int) and sha256 (str), got {json.dumps(entry)[:80]}")


def shard_problems(data: bytes, table: pa.Table | None, entry: dict) -> list[str]:
    """Why a shard's bytes do not match its manifest entry (checksum, row count); empty if they do."""
    problems = []
    if _sha256(data) != entry.get("sha256"):
        problems.append("sha256 differs from the manifest (modified or truncated)")
    if table is not None and table.num_rows != entry.get("rows"):
        problems.append(f"{table.num_rows} rows, manifest says {entry.get('rows')}")
    return problems


def _read_shard(fs: pafs.FileSystem, root: str, entry: dict, columns: list[str] | None = None) -> pa.Table:
    """A listed shard, verified against its manifest entry: an altered or missing shard is never read as whole."""
    rel, where = entry["file"], redact(f"{root}/{entry['file']}")
    todo = f"restore it, or move the output aside and regenerate (`retmask inspect {redact(root)}` lists every problem)"
    try:
        with fs.open_input_stream(f"{root}/{rel}") as f:
            data = f.read()
    except FileNotFoundError:
        raise RetmaskError(f"shard {where} is listed in {MANIFEST} but missing; {todo}") from None
    except OSError as err:
        raise RetmaskError(f"shard {where} is unreadable ({redact(str(err))}); {todo}") from None
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read(columns=columns)  # not read_table: 3x less overhead
    except (OSError, pa.ArrowException) as err:
        table, problems = None, [f"not a readable Parquet file ({err})"]
    else:
        problems = []
    problems = shard_problems(data, table, entry) + problems
    if problems:
        raise RetmaskError(f"shard {where} does not match {MANIFEST}: {'; '.join(problems)}; {todo}")
    return table


def committed_prompt_ids(out: str | Path, filesystem: pafs.FileSystem | None = None) -> set[str]:
    """Prompt ids in the shards the manifest lists (what a resumed run skips); every shard is verified."""
    fs, root = output_fs(out, filesystem)
    return _committed_ids(fs, root, read_manifest(out, filesystem))


def _committed_ids(fs: pafs.FileSystem, root: str, manifest: dict) -> set[str]:
    from concurrent.futures import ThreadPoolExecutor

    ids: set[str] = set()
    # Threads overlap storage latency (an object store's round trips) with hashing and parsing (no GIL).
    with ThreadPoolExecutor(max_workers=8) as pool:
        for table in pool.map(lambda shard: _read_shard(fs, root, shard, ["prompt_id"]), manifest["shards"]):
            ids.update(table.column("prompt_id").to_pylist())
    return ids


def manifest_digest(manifest: dict) -> str:
    """Identity of a dataset's content: the run config and the committed shards' checksums, in order.

    Timestamps, sessions and the writer lease change on every reopen without changing a single row.
    """
    stable = {"run_config": manifest.get("run_config"), "variants": manifest.get("variants"),
              "shards": [(s["file"], s["rows"], s["sha256"]) for s in manifest.get("shards", [])]}
    return "sha256:" + _sha256(json.dumps(stable, sort_keys=True, default=str).encode())


def read_pairs_table(
    out: str | Path, filesystem: pafs.FileSystem | None = None, columns: list[str] | None = None
) -> pa.Table:
    """All manifest-listed shards as one table (unlisted or temporary files are never read)."""
    fs, root = output_fs(out, filesystem)
    manifest = read_manifest(out, filesystem)
    schema = schema_for(manifest["variants"])
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    tables = [_read_shard(fs, root, s, columns) for s in manifest["shards"]]
    try:
        return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    except (pa.ArrowException, ValueError) as err:
        raise RetmaskError(f"shards in {redact(str(out))} do not share the manifest's schema ({err}); "
                           "run `retmask inspect`") from None


# ---------------------------------------------------------------------------------------------------
# resume checks: the same run (IDENTITY_KEYS), one writer (the lease)


def normalized_config(config: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(config, default=str, sort_keys=True))


def _lookup(config: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return _ABSENT
        config = config[key]
    return config


def _first_difference(old: Any, new: Any, where: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{where}.{key}")
            if diff:
                return diff
        return None
    return None if old == new else f"{where} is {json.dumps(old)} there but {json.dumps(new)} now"


def check_same_run(out: str, manifest: dict, config: dict, variants: list[str]) -> None:
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        raise RetmaskError(
            f"{out} was written as {manifest.get('format')} schema version {manifest.get('schema_version')}; "
            f"this retmask writes {FORMAT} version {SCHEMA_VERSION}: use a new output directory"
        )
    if manifest["variants"] != variants:
        raise RetmaskError(
            f"{out} holds variants {manifest['variants']}, this run makes {variants}; use a new output directory"
        )
    for key in IDENTITY_KEYS:
        diff = _first_difference(_lookup(manifest["run_config"], key), _lookup(config, key), key)
        if diff:
            raise RetmaskError(f"{out} was made by a different run: {diff}; use a new output directory to change it")


def _lease() -> dict:
    import socket

    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "since": _now()}


def check_lease(out: str, lease: dict | None, last_commit: str | None = None) -> None:
    """Refuse a second writer while the first may still be alive (one writer per output directory).

    Same host: the lease holder's pid tells (a kill -9'd driver frees it at once). Another host: the last
    commit's age, since a remote process cannot be probed (``RETMASK_LEASE_SECONDS``, default 30 min).
    """
    import socket

    if not isinstance(lease, dict):
        return
    holder = f"pid {lease.get('pid')} on {lease.get('host')} (since {lease.get('since')})"
    if lease.get("host") == socket.gethostname():
        pid = lease.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            raise RetmaskError(f"{out} is being written by {holder}; only one writer may use an output directory: "
                               "wait for it to finish or stop it, then rerun")
        return
    last = max(lease.get("since", ""), lease.get("heartbeat", ""), last_commit or "")
    try:
        age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(last)).total_seconds()
    except ValueError:
        return
    if age < LEASE_SECONDS:
        raise RetmaskError(
            f"{out} is being written by {holder}, last commit {age:.0f} s ago; only one writer may use an output "
            f"directory: stop that writer, or if it is dead rerun after {LEASE_SECONDS - age:.0f} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) holds no lease
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes | pa.Buffer) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()
