"""A generation output as a preference dataset any trainer reads: TRL, OpenRLHF, LLaMA-Factory, the Hub.

The shards keep one column per variant (``normal__text``, ``retrieval_masked__text``, ...), which only
``trainer.data`` knows how to pair. ``export_pairs`` writes the same pairs the trainer would train on
(its filters, imported from ``trainer.data``, not re-implemented) in the layout ``datasets`` loads
without arguments::

    DEST/README.md                   dataset card: ``configs`` front matter + mechanistic provenance
    DEST/export.json                 the same provenance, machine-readable
    DEST/data/train-00000.parquet    conversational: prompt/chosen/rejected as message lists, prompt_id
    DEST/data/test-00000.parquet     with ``test_fraction``: the trainer's prompt-id-hash split
    DEST/text/train-00000.parquet    with ``text``: prompt/chosen/rejected as plain strings
    DEST/dataset_info.json           with ``text``: LLaMA-Factory's registry entry for the text files

(``.jsonl`` instead of ``.parquet`` with ``fmt="jsonl"``.) DEST is written beside itself and renamed
into place, so an interrupted export leaves no half dataset, and ``overwrite`` replaces a previous export
only once the new one is complete. No import of TRL or vLLM: exporting needs neither.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_heads.config import opt
from retrieval_heads.errors import RetmaskError, redact

log = logging.getLogger(__name__)

FORMATS = ("parquet", "jsonl")
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
CONVERSATIONAL = pa.schema([("prompt_id", pa.string()), ("prompt", _MESSAGES), ("chosen", _MESSAGES),
                            ("rejected", _MESSAGES)])
TEXT = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                  ("rejected", pa.string())])
LLAMA_FACTORY_NAME = "retmask_pairs"


@dataclass
class ExportConfig:
    """Which pairs ``retmask export-pairs`` writes and how; ``jobs/configs/export_pairs.yaml`` maps 1:1."""

    chosen: str = opt("normal", "variant of the chosen answers")
    rejected: str = opt("retrieval_masked", "variant of the rejected answers")
    format: str = opt("parquet", "parquet | jsonl")
    text: bool = opt(False, "also write plain-text pairs (config `text`, LLaMA-Factory)")
    keep_truncated: bool = opt(False, "keep pairs that hit the token limit (dropped by default, as the trainer does)")
    max_tokens: int | None = opt(None, "drop pairs with a response longer than this many tokens")
    test_fraction: float = opt(0.0, "share held out as split `test` (prompt-id hash, like train)")
    overwrite: bool = opt(False, "replace a non-empty destination directory (a previous export)")


def export_pairs(
    out_dir: str | Path,
    dest: str | Path,
    chosen: str = "normal",
    rejected: str = "retrieval_masked",
    fmt: str = "parquet",
    drop_truncated: bool = True,
    max_tokens: int | None = None,
    text: bool = False,
    test_fraction: float = 0.0,
    overwrite: bool = False,
) -> dict:
    """Write the filtered ``chosen``/``rejected`` pairs of generation output ``out_dir`` to ``dest``; a summary."""
    from pipeline.shards import manifest_digest
    from trainer.data import eval_bucket, filter_pairs, pairs_digest, read_pair_table

    if fmt not in FORMATS:
        raise RetmaskError(f"unknown export format {fmt!r}; use one of {list(FORMATS)}")
    if not 0.0 <= test_fraction < 1.0:
        raise RetmaskError(f"test fraction must be in [0, 1), got {test_fraction}")
    if max_tokens is not None and max_tokens < 1:
        raise RetmaskError(f"max tokens must be a positive number of response tokens, got {max_tokens}")
    target = _check_dest(out_dir, dest, overwrite)
    table, manifest = read_pair_table(out_dir, chosen, rejected)  # unknown variants: named, with the known ones
    rows = table.to_pylist()
    kept, removed = filter_pairs(rows, chosen, rejected, redact(str(out_dir)), drop_truncated=drop_truncated,
                                 max_response_tokens=max_tokens)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for row in kept:
        splits["test" if eval_bucket(row["prompt_id"]) < test_fraction else "train"].append(row)
    if not splits["train"]:
        raise RetmaskError(f"all {len(kept)} pairs fell into the test split (test fraction {test_fraction}); lower it")
    if test_fraction > 0 and not splits["test"]:
        log.warning("no pair of %d fell into the test split (test fraction %s); writing train only",
                    len(kept), test_fraction)
    splits = {name: part for name, part in splits.items() if part}
    info = {
        "format": "retmask-preference-export", "version": 1, "file_format": fmt,
        "chosen": chosen, "rejected": rejected, "text": text,
        "source": {"path": redact(str(out_dir)), "manifest_digest": manifest_digest(manifest),
                   "pairs_digest": pairs_digest(manifest), "schema_version": manifest.get("schema_version"),
                   "rows": len(rows), "shards": len(manifest["shards"]), "variants": manifest["variants"]},
        "filters": {"drop_truncated": drop_truncated, "max_response_tokens": max_tokens,
                    "test_fraction": test_fraction, "removed": removed},
        "pairs": {"kept": len(kept), **{name: len(part) for name, part in splits.items()}},
        "provenance": _provenance(manifest["run_config"], chosen, rejected),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "retmask_version": _version(),
    }
    configs = {"default": "data", **({"text": "text"} if text else {})}
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        files = []
        for config, folder in configs.items():
            for name, part in splits.items():
                path = tmp / folder / f"{name}-00000.{fmt}"
                _write(path, _records(part, chosen, rejected, plain=config == "text"), config == "text", fmt)
                files.append(str(path.relative_to(tmp)))
        info["files"] = files
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        if text:
            (tmp / "dataset_info.json").write_text(json.dumps(_llama_factory_info(splits, fmt), indent=2) + "\n")
        (tmp / "README.md").write_text(dataset_card(info, configs, str(dest)))
        _publish(tmp, target)
    except OSError as err:
        raise RetmaskError(f"cannot write the export to {dest} ({err.strerror or err}); nothing there changed: "
                           "free space or fix permissions, or choose another --to") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %d %s/%s pairs from %s to %s (removed %s)", len(kept), chosen, rejected,
             redact(str(out_dir)), target, removed)
    return {"dest": str(dest), "rows": len(rows), "kept": len(kept), "removed": removed,
            **{name: len(part) for name, part in splits.items()}, "files": files}


def _check_dest(out_dir: str | Path, dest: str | Path, overwrite: bool) -> Path:
    """The local directory to write; refuses what would lose data: a non-empty DEST, the source itself."""
    if "://" in str(dest):
        raise RetmaskError(f"--to {redact(str(dest))}: export writes a local directory; upload it afterwards "
                           "(e.g. `huggingface-cli upload` or your object store's copy)")
    target = Path(dest).expanduser().resolve()
    if "://" not in str(out_dir):
        source = Path(out_dir).expanduser().resolve()
        if target == source or source in target.parents or target in source.parents:
            raise RetmaskError(f"--to {dest} overlaps the generation output {out_dir}; "
                               "export to a directory outside it")
    if target.exists() and not target.is_dir():
        raise RetmaskError(f"--to {dest} is a file; give a directory (new or empty)")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise RetmaskError(f"--to {dest} exists and is not empty; pass --overwrite to replace it, "
                               "or pick a new directory")
        if (target / "manifest.json").exists():
            raise RetmaskError(f"--to {dest} holds a generation output (manifest.json); it is never overwritten: "
                               "pick another directory")
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Move the complete export into place; a replaced export is removed only after the new one is in."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(tmp, target)  # rename(2) onto a missing or empty directory
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _records(rows: list[dict], chosen: str, rejected: str, plain: bool) -> list[dict]:
    # TRL's standard preference formats: conversational (TRL applies the model's chat template) or plain text
    if plain:
        return [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "chosen": r[f"{chosen}__text"],
                 "rejected": r[f"{rejected}__text"]} for r in rows]
    return [{"prompt_id": r["prompt_id"], "prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r[f"{chosen}__text"]}],
             "rejected": [{"role": "assistant", "content": r[f"{rejected}__text"]}]} for r in rows]


def _write(path: Path, records: list[dict], plain: bool, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records, schema=TEXT if plain else CONVERSATIONAL), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _provenance(cfg: dict, chosen: str, rejected: str) -> dict:
    """What made the pairs, mechanistically: which model, which heads were silenced per side and why."""
    masks = cfg.get("masks") or {}
    heads = {}
    for variant in (chosen, rejected):
        mask = masks.get(variant) or {}
        spec = mask.get("heads", "")
        heads[variant] = {"heads": spec, "num_heads": len(spec.split(",")) if spec else 0, "mask_id": mask.get("id"),
                          "selection": mask.get("selection"), "scores_digest": mask.get("scores_digest")}
    digests = sorted({h["scores_digest"] for h in heads.values() if h["scores_digest"]})
    model = cfg.get("model") or {}
    return {
        "model": {k: model.get(k) for k in ("id", "hash", "revision") if model.get(k) is not None},
        "scores_file": cfg.get("scores_file"), "scores_digest": digests[0] if len(digests) == 1 else digests or None,
        "heads": heads, "sampling": cfg.get("sampling"), "seed": cfg.get("seed"),
        "chat_template": cfg.get("chat_template"), "engine": cfg.get("engine"),
    }


def _llama_factory_info(splits: dict, fmt: str) -> dict:
    # LLaMA-Factory's alpaca ranking format takes plain-string chosen/rejected; its sharegpt ranking format
    # wants one message *dict* per side, not TRL's message lists, so the text files are the ones it reads.
    entry = {"ranking": True, "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}}
    return {f"{LLAMA_FACTORY_NAME}{'' if name == 'train' else '_' + name}":
            {"file_name": f"text/{name}-00000.{fmt}", **entry} for name in splits}


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("retmask")
    except metadata.PackageNotFoundError:
        return None


def dataset_card(info: dict, configs: dict[str, str], dest: str) -> str:
    """README.md of an export: ``configs`` so ``load_dataset(DEST)`` works, provenance, filters, how to train."""
    fmt, prov, src, filters = info["file_format"], info["provenance"], info["source"], info["filters"]
    chosen, rejected = info["chosen"], info["rejected"]
    splits = [name for name in ("train", "test") if name in info["pairs"]]
    yaml = ["---", "configs:"]
    for config, folder in configs.items():
        yaml += [f"- config_name: {config}", "  data_files:"]
        yaml += [f"  - split: {name}\n    path: {folder}/{name}-*.{fmt}" for name in splits]
    yaml += ["tags:", "- dpo", "- preference", "- retmask", "---"]
    model = prov["model"]
    heads = "\n".join(
        f"  - `{v}` ({'chosen' if v == chosen else 'rejected'}): "
        + (f"{h['num_heads']} heads masked `{h['heads']}` (mask `{h['mask_id']}`), selection "
           f"`{json.dumps(h['selection'], sort_keys=True)}`, scores digest `{h['scores_digest']}`"
           if h["num_heads"] else "no head masked")
        for v, h in prov["heads"].items())
    removed = " | ".join(str(n) for n in filters["removed"].values())
    counts = ", ".join(f"{name} {info['pairs'][name]}" for name in splits)
    test_note = (f"The test split is the prompt-id-hash split `retmask train` holds out ({filters['test_fraction']})."
                 if "test" in splits else "")
    revision = f", revision {model['revision']}" if model.get("revision") else ""
    text_note = ("\nThe `text` config holds the same pairs with `prompt`, `chosen`, `rejected` as plain strings "
                 f"(no chat template applied): `load_dataset(\"{dest}\", \"text\")`.\n" if "text" in configs else "")
    llama_factory = (
        f"`dataset_info.json` registers the `text` files as `{LLAMA_FACTORY_NAME}` (alpaca ranking format):\n\n"
        f"    llamafactory-cli train --stage dpo --do_train --model_name_or_path MODEL --template TEMPLATE "
        f"--dataset_dir {dest} --dataset {LLAMA_FACTORY_NAME} --finetuning_type lora --output_dir runs/lf-dpo"
        if "text" in configs else
        "Export with `--text`: LLaMA-Factory reads the plain-text files (alpaca ranking format) through the "
        "`dataset_info.json` written beside them.")
    return "\n".join(yaml) + f"""
# RetMask preference pairs: `{chosen}` (chosen) vs `{rejected}` (rejected)

Both answers of a pair come from the same model on the same prompt; each variant ran with the attention
heads listed under provenance masked (their output zeroed at every position, prefill and decode). With
`normal` chosen and `retrieval_masked` rejected, the pairs prefer answers that use the retrieval heads,
which copy facts from the context (RetMask).

Splits: {counts} pairs, in TRL's conversational preference format (`prompt` = user message list,
`chosen`/`rejected` = assistant message lists; TRL applies the model's chat template), plus `prompt_id`.
{test_note}
{text_note}
## Filters (the ones `retmask train` applies)

{src["rows"]} generated rows, {info["pairs"]["kept"]} pairs kept. Truncated answers dropped:
{filters["drop_truncated"]}; response token limit: {filters["max_response_tokens"]}.

| empty | identical | truncated | too long |
|---|---|---|---|
| {removed} |

## Provenance

- model: {model.get("id", "?")} (`{model.get("hash", "?")}`{revision})
- head scores: `{prov["scores_file"]}` (digest `{prov["scores_digest"]}`)
- heads per variant:
{heads}
- sampling: `{json.dumps(prov["sampling"], sort_keys=True)}`, seed {prov["seed"]}
- chat template: `{json.dumps(prov["chat_template"], sort_keys=True)}`
- source: `{src["path"]}`: {src["rows"]} rows in {src["shards"]} shard(s) (schema version {src["schema_version"]}),
  manifest digest `{src["manifest_digest"]}`, pairs digest `{src["pairs_digest"]}`
- exported {info["exported_at"]} by retmask {info["retmask_version"]}; all of it, machine-readable: `export.json`

## Training on it

TRL's own DPO script (`trl dpo` launches it through accelerate):

    python -m trl.scripts.dpo --model_name_or_path MODEL --dataset_name {dest} --output_dir runs/trl-dpo

OpenRLHF (the message lists go through the tokenizer's chat template):

    deepspeed --module openrlhf.cli.train_dpo --pretrain MODEL --dataset {dest} --prompt_key prompt \\
        --chosen_key chosen --rejected_key rejected --apply_chat_template --save_path runs/openrlhf-dpo

(OpenRLHF versions that read a local directory file by file instead of through this card: pass
`--dataset {dest}/data/train-00000.{fmt}`.)

LLaMA-Factory: {llama_factory}

```python
from datasets import load_dataset
pairs = load_dataset("{dest}")  # DatasetDict: {", ".join(splits)}
```
"""
