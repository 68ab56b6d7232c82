"""Prompt sources by name: the per-format readers that ``load_prompts`` (``pipeline.prompts``) opens.

Sources (``load_prompts(name, path, **options)``):

- ``jsonl``      one JSON object per line (``.jsonl`` or ``.jsonl.gz``); options ``text_field="prompt"``,
                 ``id_field="id"``.
- ``parquet``    Parquet file(s); same options; read with ``iter_batches`` so memory stays flat.
- ``hf_dataset`` a local Hugging Face dataset: a ``save_to_disk`` directory or a directory of data
                 files; same options plus ``split="train"``.
- ``lmsys``      LMSYS-Chat-1M(-Synth) records (parquet or jsonl): the first user turn of
                 ``conversation``; redacted, empty and duplicate records are skipped (as RetMask does).
- ``builtin``    the demo prompts shipped in ``pipeline/data/prompts.jsonl``.

A registry, so that a new format is one ``@register_source`` function here and the stream, its checks and
its rejects stay the same for every format. A path may be a file or a directory (all matching files under
it, sorted). Sources stream: a file is never read whole, whatever its size.

What is a bad row and what is a bad file: a line that is not UTF-8 or not JSON is one bad row (reject
kinds ``not UTF-8`` and ``invalid JSON``; the lines after it still read). A file that cannot be read as
the source's format at all is a user error (``RetmaskError`` naming the file): a missing or unreadable
path, a directory without matching files, a ``.jsonl.gz`` whose gzip stream is broken (decompression
cannot resynchronise, so nothing after the break can be read), a JSONL file that is really gzip, Parquet,
UTF-16 or binary, a JSONL file none of whose lines is UTF-8 (another encoding), and a file given to the
``parquet`` source that is not Parquet.
"""

from __future__ import annotations

import gzip
import json
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pipeline.prompt_rows import Prompt, Reject, _first_user_turn, _from_record
from retrieval_heads.errors import RetmaskError

SourceFn = Callable[..., Iterator[list]]  # (path, batch_size=..., **options) -> batches of Prompt | Reject

SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Register a prompt source under ``name`` (a function returning an iterator of batches)."""

    def add(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        return fn

    return add


# LMSYS-Chat-1M marks scrubbed records ``redacted``; LMSYS-Chat-1M-Synth adds per-language flags
# (``duplicate_user_instruction_*`` holds the first occurrence's id, ``empty_user_instruction_*`` is a bool).
LMSYS_SKIP_FLAGS = (
    "redacted", "empty_user_instruction_en", "empty_user_instruction_ja",
    "duplicate_user_instruction_en", "duplicate_user_instruction_ja",
)


def _existing(path: str | Path | None, source: str) -> Path:
    if path is None:
        raise RetmaskError(f"prompt source {source!r} needs a path")
    p = Path(path)
    if not p.exists():
        raise RetmaskError(f"prompt file {p} does not exist; check the path")
    return p


# suffixes of the file-based sources, to point at the right source when a directory holds the other kind
_SOURCE_SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz"), "parquet": (".parquet",)}


def _files(path: str | Path | None, suffixes: tuple[str, ...], source: str) -> list[Path]:
    p = _existing(path, source)
    if p.is_file():
        return [p]
    if not p.is_dir():  # a FIFO, socket or device: not something a file source can read (or re-read on resume)
        raise RetmaskError(f"prompt path {p} is neither a file nor a directory; give a prompt file or a directory")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes) and not f.name.startswith("."))
    if not files:
        other = next((name for name, sfx in _SOURCE_SUFFIXES.items() if name != source
                      and any(f.name.endswith(sfx) for f in p.rglob("*") if f.is_file())), None)
        todo = f"it holds {other} files: use the {other} source" if other else "give a file or a directory holding some"
        raise RetmaskError(f"prompt path {p} is a directory with no {'/'.join(suffixes)} files; {todo}")
    return files


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# First bytes of files that are not JSON lines text, with what to do about each.
_NOT_JSONL = (
    (b"\x1f\x8b", "is gzip-compressed; name it .jsonl.gz (or gunzip it)"),
    (b"PAR1", "is a Parquet file; use the parquet source"),
    (b"\xff\xfe", "is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"),
    (b"\xfe\xff", "is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"),
)


def _file_lines(file: Path) -> Iterator[bytes]:
    """Raw lines of a .jsonl or .jsonl.gz file; a file that cannot be read as text lines is a user error."""
    gz = file.name.endswith(".gz")
    read = 0
    try:
        # binary: decoding per line keeps one bad line a reject instead of ending the whole file
        with (gzip.open(file, "rb") if gz else open(file, "rb")) as fh:
            head = fh.peek(4096)[:4096] if hasattr(fh, "peek") else b""
            problem = next((what for magic, what in _NOT_JSONL if head.startswith(magic)), None)
            if problem is None and b"\0" in head:
                problem = "holds NUL bytes: it is binary, not JSON lines text; give a .jsonl file"
            if problem:
                raise RetmaskError(f"prompt file {file}{' (after gunzip)' if gz else ''} {problem}")
            for line in fh:
                yield line
                read += 1
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        # a gzip stream cannot be resynchronised after damage: nothing past the break is readable
        if read == 0 and isinstance(err, gzip.BadGzipFile) and "Not a gzipped file" in str(err):
            raise RetmaskError(f"prompt file {file} is not gzip-compressed ({_one_line(err)}); "
                               "rename it to .jsonl if it is plain text") from None
        raise RetmaskError(
            f"prompt file {file} is a broken gzip stream after line {read} ({_one_line(err)}); "
            "re-download or re-compress it (`gzip -t` checks a file)"
        ) from None
    except OSError as err:
        raise RetmaskError(f"cannot read prompt file {file} after line {read} ({_one_line(err)}); "
                           "check that it is a readable file") from None


def _json_lines(lines: Iterable[bytes], name: str) -> Iterator[Any]:
    """Parsed objects of a JSONL stream; a bad line becomes a Reject instead of stopping the run."""
    decoded = not_utf8 = 0
    for lineno, raw in enumerate(lines, 1):
        try:
            # utf-8-sig on line 1: editors on Windows start UTF-8 files with a byte order mark
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            not_utf8 += 1
            text = raw[:200].decode("utf-8", "backslashreplace")
            yield Reject({"file": name, "line": lineno, "text": text},
                         f"not UTF-8: line {lineno}, byte {err.start + 1} ({err.reason})")
            continue
        if not line.strip():
            continue
        decoded += 1
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            yield Reject({"file": name, "line": lineno, "text": line[:200]}, f"invalid JSON: line {lineno} ({err.msg})")
    if not_utf8 and not decoded:  # not one bad line but a file in another encoding
        raise RetmaskError(
            f"prompt file {name}: none of its {not_utf8} lines is UTF-8; convert it to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        )


def _parquet_records(
    file: Path, batch_size: int, wanted: Sequence[str], required: Sequence[str]
) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer off: with it (pyarrow's default) iter_batches keeps every row group it has read cached,
        # so memory grows with the file (~70 MB per 1M short prompts) instead of staying at one row group
        pf = pq.ParquetFile(file, pre_buffer=False)
    except Exception as err:  # pyarrow raises several types for a non-Parquet file
        raise RetmaskError(f"prompt file {file} is not a readable Parquet file ({_one_line(err)}); "
                           "give a Parquet file, or the jsonl source for JSON lines") from None
    names = pf.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        columns = ", ".join(names)
        raise RetmaskError(f"prompt file {file} has no column {missing[0]!r} (columns: {columns}); "
                           "set the field option")
    batches, read = pf.iter_batches(batch_size=batch_size, columns=[c for c in wanted if c in names]), 0
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as err:  # a damaged page or row group: the rest cannot be trusted
            raise RetmaskError(f"prompt file {file} is damaged after row {read} ({_one_line(err)}); "
                               "re-export or re-download it") from None
        read += rb.num_rows
        yield rb.to_pylist()


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _records(
    files: list[Path], batch_size: int, wanted: Sequence[str], required: Sequence[str], fmt: str | None = None
) -> Iterator[list[Any]]:
    """Raw record batches from JSONL and Parquet files (JSON parse errors arrive as Rejects).

    ``fmt`` ("jsonl" or "parquet") is the source's format; None decides by suffix (lmsys reads both).
    A file given by name is read as its source's format whatever its suffix.
    """
    for f in files:
        if (fmt or ("parquet" if f.suffix == ".parquet" else "jsonl")) == "parquet":
            yield from _parquet_records(f, batch_size, wanted, required)
        else:
            # the LMSYS-Chat-1M-Synth recovery scripts export .jsonl.gz
            yield from _batched(_json_lines(_file_lines(f), str(f)), batch_size)


def _convert(batches: Iterator[list[Any]], convert: Callable[[Any], Prompt | Reject]) -> Iterator[list]:
    for batch in batches:
        yield [r if isinstance(r, Reject) else convert(r) for r in batch]


@register_source("jsonl")
def jsonl_source(path, *, batch_size: int, text_field: str = "prompt", id_field: str | None = "id") -> Iterator[list]:
    """Objects, one per line; ``text_field`` holds the prompt, ``id_field`` (optional) its id."""
    files = _files(path, (".jsonl", ".jsonl.gz"), "jsonl")
    meta = {"source": "jsonl"}
    return _convert(_records(files, batch_size, [], [], "jsonl"), lambda r: _from_record(r, text_field, id_field, meta))


@register_source("parquet")
def parquet_source(path, *, batch_size: int, text_field: str = "prompt", id_field: str | None = "id") -> Iterator[list]:
    """Parquet rows; only the text and id columns are read."""
    files = _files(path, (".parquet",), "parquet")
    meta = {"source": "parquet"}
    wanted = [text_field] + ([id_field] if id_field else [])
    batches = _records(files, batch_size, wanted, [text_field], "parquet")
    return _convert(batches, lambda r: _from_record(r, text_field, id_field, meta))


@register_source("hf_dataset")
def hf_dataset_source(
    path, *, batch_size: int, text_field: str = "prompt", id_field: str | None = "id", split: str = "train"
) -> Iterator[list]:
    """A local Hugging Face dataset: a ``save_to_disk`` directory, or a directory of data files."""
    import datasets

    p = _existing(path, "hf_dataset")
    if not p.is_dir():
        raise RetmaskError(f"hf_dataset expects a directory, {p} is a file; use the jsonl or parquet source")
    try:
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            ds = datasets.load_from_disk(str(p))  # memory-mapped Arrow: iterating does not load it all
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise RetmaskError(f"dataset {p} has no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            # streaming: no conversion into the HF cache, rows are read as iterated
            ds = datasets.load_dataset(str(p), split=split, streaming=True)
    except RetmaskError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, DataFilesNotFoundError)
        raise RetmaskError(f"cannot open {p} as a Hugging Face dataset ({type(err).__name__}: {_one_line(err)}); "
                           "give a save_to_disk directory or a directory of data files") from None
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise RetmaskError(f"dataset {p} has no column {text_field!r} (columns: {', '.join(columns)}); set text_field")
    meta = {"source": "hf_dataset"}

    def batches() -> Iterator[list]:
        it, read = iter(ds.iter(batch_size=batch_size)), 0
        while True:
            try:
                cols = next(it)
            except StopIteration:
                return
            except Exception as err:  # streamed data files fail while read (bad encoding, broken JSON or Parquet)
                raise RetmaskError(f"cannot read dataset {p} after row {read} "
                                   f"({type(err).__name__}: {_one_line(err)}); check its data files") from None
            rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
            read += len(rows)
            yield [_from_record(r, text_field, id_field, meta) for r in rows]

    return batches()


@register_source("lmsys")
def lmsys_source(
    path,
    *,
    batch_size: int,
    id_field: str | None = None,
    conversation_field: str = "conversation",
    skip_flags: Sequence[str] = LMSYS_SKIP_FLAGS,
) -> Iterator[list]:
    """LMSYS-Chat-1M(-Synth) records; the prompt is the first user turn of ``conversation``.

    Records with a set flag in ``skip_flags`` are rejected. Ids default to the content hash
    (``id_field=None``) so that repeated prompts collapse into one, which is RetMask's de-duplication;
    ``id_field="conversation_id"`` keeps per-conversation ids instead.
    """
    files = _files(path, (".parquet", ".jsonl", ".jsonl.gz"), "lmsys")
    wanted = [conversation_field, *skip_flags, "conversation_id", "language", "model"]
    wanted += [id_field] if id_field else []
    meta = {"source": "lmsys"}
    batches = _records(files, batch_size, list(dict.fromkeys(wanted)), [conversation_field])
    return _convert(batches, lambda r: _first_user_turn(r, conversation_field, id_field, skip_flags, meta))


def _builtin_file():
    return resources.files("pipeline") / "data" / "prompts.jsonl"


@register_source("builtin")
def builtin_source(path=None, *, batch_size: int) -> Iterator[list]:
    """The demo prompts shipped with the package (``{"id": "demo-0001", "prompt": ...}`` per line)."""
    if path is not None:
        raise RetmaskError("the builtin prompt source takes no path; use the jsonl source for your own file")
    res = _builtin_file()
    if not res.is_file():
        raise RetmaskError("built-in prompts pipeline/data/prompts.jsonl are missing from the package; "
                           "reinstall retmask")
    meta = {"source": "builtin"}

    def batches() -> Iterator[list]:
        with res.open("rb") as fh:
            for batch in _batched(_json_lines(fh, "builtin"), batch_size):
                yield [r if isinstance(r, Reject) else _from_record(r, "prompt", "id", meta) for r in batch]

    return batches()
