"""What ``retmask inspect`` reports about an output directory: statistics, samples, plots, validation.

``inspect_run`` never stops at a bad shard: a listed shard that is missing, corrupt, has a wrong
checksum or a foreign schema, and a data file the manifest does not list, are named in ``problems``
and left out of the statistics. Shards are read one at a time, so memory stays flat on large runs.
"""

from __future__ import annotations

import itertools
import json
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.shard_schema import FORMAT, SCHEMA_VERSION, schema_for
from pipeline.shards import DATA, output_fs, read_manifest, shard_problems
from retrieval_heads.errors import redact

BASELINE = "normal"  # the chosen side of every pair


def inspect_run(
    out: str | Path,
    *,
    plots_dir: str | Path | None = None,
    filesystem: pafs.FileSystem | None = None,
    num_samples: int = 3,
    sample_chars: int = 300,
) -> dict[str, Any]:
    """Statistics and validation problems of an output directory; histograms go to ``plots_dir``."""
    fs, root = output_fs(out, filesystem)
    manifest = read_manifest(out, filesystem)
    problems: list[str] = []
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        found = f"{manifest.get('format')} v{manifest.get('schema_version')}"
        problems.append(f"manifest.json: format {found}, expected {FORMAT} v{SCHEMA_VERSION}")
    variants = list(manifest["variants"])
    schema = schema_for(variants)
    stats = _Stats(variants)
    samples: list[dict] = []
    listed = {s["file"] for s in manifest["shards"]}
    seen_ids: set[str] = set()
    duplicates = 0
    for entry in manifest["shards"]:
        table, reasons = _load_shard(fs, root, entry, schema)
        if reasons:
            problems.append(f"{entry['file']}: {'; '.join(reasons)}")
            continue
        ids = table.column("prompt_id").to_pylist()
        duplicates += len(seen_ids.intersection(ids))
        seen_ids.update(ids)
        stats.add(table)
        for row in table.slice(0, max(0, num_samples - len(samples))).to_pylist():
            samples.append(_sample(row, variants, sample_chars))
    if duplicates:
        problems.append(f"{duplicates} prompt ids appear in more than one shard")
    problems += _unlisted(fs, root, listed)
    report = {
        "out": redact(str(out)),
        "schema_version": manifest.get("schema_version"),
        "variants": variants,
        "run_config": manifest.get("run_config", {}),
        "shards": {"listed": len(manifest["shards"]), "valid": stats.shards},
        "rows": stats.rows,
        "manifest_rows": manifest.get("num_rows"),
        "prompt_tokens": _summary(stats.prompt_tokens),
        "variant_stats": stats.variant_stats(),
        "pairs": stats.pair_stats(),
        "samples": samples,
        "plots": _histograms(stats, Path(plots_dir)) if plots_dir is not None else {},
        "problems": problems,
    }
    return report


def _load_shard(fs: pafs.FileSystem, root: str, entry: dict, schema: pa.Schema) -> tuple[pa.Table | None, list[str]]:
    """The shard's table, or the reasons it cannot be trusted."""
    path = f"{root}/{entry['file']}"
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None, ["listed in the manifest but missing"]
        with fs.open_input_stream(path) as f:
            data = f.read()
    except OSError as err:
        return None, [f"unreadable ({err})"]
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        return None, shard_problems(data, None, entry) + [f"corrupt: not a readable Parquet file ({err})"]
    reasons = shard_problems(data, table, entry)  # checksum and row count, as every reader checks them
    if not table.schema.equals(schema, check_metadata=False):
        got = {f.name: f.type for f in table.schema}
        missing = [f.name for f in schema if f.name not in got]
        wrong = [f"{f.name} is {got[f.name]} not {f.type}" for f in schema if f.name in got and got[f.name] != f.type]
        extra = sorted(set(got) - set(schema.names))
        detail = "; ".join(
            x
            for x in (
                f"missing columns {missing}" if missing else "",
                ", ".join(wrong),
                f"unexpected columns {extra}" if extra else "",
            )
            if x
        )
        reasons.append(f"foreign schema ({detail or 'column order or nullability differs'})")
    version = (table.schema.metadata or {}).get(b"retmask.schema_version")
    if version is not None and version != str(SCHEMA_VERSION).encode():
        reasons.append(f"schema version {version.decode()} in the file, expected {SCHEMA_VERSION}")
    return (None, reasons) if reasons else (table, [])


def _unlisted(fs: pafs.FileSystem, root: str, listed: set[str]) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{DATA}", allow_not_found=True, recursive=True))
    problems = []
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[len(root) + 1 :]
        if info.type != pafs.FileType.File or rel in listed:
            continue
        why = (
            "temporary file of an interrupted writer"
            if info.base_name.startswith(".tmp-")
            else "not listed in the manifest"
        )
        problems.append(f"{rel}: {why}; readers ignore it, reopening the run removes it")
    return problems


class _Stats:
    """Running counts over shards; token counts are kept (small ints) for percentiles and plots."""

    def __init__(self, variants: list[str]):
        self.variants = variants
        self.shards = self.rows = 0
        self.prompt_tokens: list[np.ndarray] = []
        self.tokens: dict[str, list[np.ndarray]] = {v: [] for v in variants}
        self.outputs: Counter[str] = Counter()
        self.empty: Counter[str] = Counter()
        self.finish: dict[str, Counter[str]] = {v: Counter() for v in variants}
        self.pairs: dict[str, Counter[str]] = {v: Counter() for v in variants if v != BASELINE}

    def add(self, t: pa.Table) -> None:
        self.shards += 1
        self.rows += t.num_rows
        self.prompt_tokens.append(_ints(t.column("num_prompt_tokens")))
        empty, truncated = {}, {}
        for v in self.variants:
            text = t.column(f"{v}__text")
            self.outputs[v] += len(text) - text.null_count
            empty[v] = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True)
            truncated[v] = pc.fill_null(pc.equal(t.column(f"{v}__finish_reason"), "length"), False)
            self.empty[v] += pc.sum(empty[v]).as_py() or 0
            self.tokens[v].append(_ints(t.column(f"{v}__num_tokens")))
            reasons = t.column(f"{v}__finish_reason").fill_null("<null>").to_pylist()
            self.finish[v].update(reasons)
        if BASELINE not in self.variants:
            return
        base = t.column(f"{BASELINE}__text")
        for v, counts in self.pairs.items():
            identical = pc.fill_null(pc.equal(base, t.column(f"{v}__text")), False)
            either_empty = pc.or_(empty[BASELINE], empty[v])
            either_truncated = pc.or_(truncated[BASELINE], truncated[v])
            unusable = pc.or_(pc.or_(identical, either_empty), either_truncated)
            counts["identical"] += pc.sum(identical).as_py() or 0
            counts["empty"] += pc.sum(either_empty).as_py() or 0
            counts["truncated"] += pc.sum(either_truncated).as_py() or 0
            counts["usable"] += t.num_rows - (pc.sum(unusable).as_py() or 0)

    def variant_stats(self) -> dict[str, dict]:
        return {
            v: {
                "outputs": self.outputs[v],
                "empty": self.empty[v],
                "finish_reasons": dict(self.finish[v].most_common()),
                "tokens": _summary(self.tokens[v]),
            }
            for v in self.variants
        }

    def pair_stats(self) -> dict[str, dict]:
        keys = ("identical", "empty", "truncated", "usable")
        return (
            {v: {k: counts[k] for k in keys} for v, counts in self.pairs.items()} if BASELINE in self.variants else {}
        )


def _ints(column: pa.ChunkedArray) -> np.ndarray:
    return column.drop_null().to_numpy().astype(np.int64)


def _summary(chunks: list[np.ndarray]) -> dict[str, float] | None:
    values = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    if not len(values):
        return None
    p50, p90 = np.percentile(values, [50, 90])
    return {"mean": round(float(values.mean()), 1), "p50": float(p50), "p90": float(p90), "max": int(values.max())}


def _sample(row: dict, variants: list[str], chars: int) -> dict:
    cut = lambda s: s if s is None or len(s) <= chars else s[: chars - 1] + "…"  # noqa: E731
    return {
        "prompt_id": row["prompt_id"],
        "prompt": cut(row["prompt"]),
        **{v: cut(row[f"{v}__text"]) for v in variants},
    }


def _histograms(stats: _Stats, plots_dir: Path) -> dict[str, str]:
    # Figure + Agg canvas instead of pyplot: no global backend switch, safe inside other programs
    from matplotlib.figure import Figure

    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for v in stats.variants:
        values = np.concatenate(stats.tokens[v]) if stats.tokens[v] else np.zeros(0)
        fig = Figure(figsize=(6, 3.5), layout="constrained")
        ax = fig.subplots()
        ax.hist(values, bins=min(50, max(1, len(np.unique(values)))), color="tab:blue" if v == BASELINE else "tab:red")
        ax.set(title=f"{v}: response length ({len(values)} rows)", xlabel="generated tokens", ylabel="rows")
        path = plots_dir / f"tokens_{v}.png"
        fig.savefig(path, dpi=100)
        paths[v] = str(path)
    return paths


def format_report(report: dict[str, Any], width: int = 100) -> str:
    """The report of ``inspect_run`` as plain text."""
    cfg = report["run_config"]
    lines = [
        f"output      {report['out']}  (schema v{report['schema_version']})",
        f"model       {cfg.get('model', {}).get('id', '?')}  {cfg.get('model', {}).get('hash', '')}",
        f"sampling    {json.dumps(cfg.get('sampling'), sort_keys=True)}  seed {cfg.get('seed')}",
        f"rows        {report['rows']} in {report['shards']['valid']}/{report['shards']['listed']} valid shards "
        f"(manifest says {report['manifest_rows']})",
        f"prompt len  {_fmt_tokens(report['prompt_tokens'])}",
        "",
        f"{'variant':<20} {'outputs':>8} {'empty':>6}  tokens (mean/p50/p90/max)   finish reasons",
    ]
    for v, s in report["variant_stats"].items():
        reasons = ", ".join(f"{k} {n}" for k, n in s["finish_reasons"].items())
        lines.append(f"{v:<20} {s['outputs']:>8} {s['empty']:>6}  {_fmt_tokens(s['tokens']):<27} {reasons}")
    if report["pairs"]:
        lines += ["", f"pairs vs {BASELINE:<11} {'identical':>9} {'empty':>6} {'truncated':>9} {'usable':>7}"]
        for v, p in report["pairs"].items():
            lines.append(f"{v:<20} {p['identical']:>9} {p['empty']:>6} {p['truncated']:>9} {p['usable']:>7}")
    for i, sample in enumerate(report["samples"], 1):
        lines += ["", f"--- sample {i}: {sample['prompt_id']}", *textwrap.wrap(f"prompt: {sample['prompt']}", width)]
        lines += _side_by_side({v: sample[v] for v in report["variants"]}, width)
    if report["plots"]:
        lines += ["", "histograms: " + ", ".join(report["plots"].values())]
    lines += ["", f"problems ({len(report['problems'])}):" if report["problems"] else "problems: none"]
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)


def _fmt_tokens(s: dict | None) -> str:
    return "-" if s is None else f"{s['mean']:g}/{s['p50']:g}/{s['p90']:g}/{s['max']}"


def _side_by_side(texts: dict[str, str | None], width: int) -> list[str]:
    col = max(20, (width - 3 * (len(texts) - 1)) // len(texts))
    wrapped = [
        [name.ljust(col)[:col], "-" * col] + textwrap.wrap("<null>" if text is None else text.strip() or "<empty>", col)
        for name, text in texts.items()
    ]
    return [" | ".join(c.ljust(col) for c in row).rstrip() for row in itertools.zip_longest(*wrapped, fillvalue="")]
