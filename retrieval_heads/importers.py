"""Head scores published in other methods' formats, read into the one ``HeadScores`` the project uses.

Formats are registered by name, like the selection strategies in ``scores.py``:

- ``wu``: Wu et al.'s ``{"layer-head": [score per counted trial]}`` JSON (RetMask, HeadKV and DeCoRe publish
  the same). Loaded unchanged.
- ``qrhead``: QRHead (Zhang et al. 2025, ``princeton-pli/QRHead``). Its detection scripts write a JSON list of
  ``["layer-head", QRscore]`` pairs, every head, best first; its retriever configs name the chosen heads as
  ``attn_head_set: "14-22,13-16,..."`` (best first, no scores). A list with scores keeps them (one value per
  head). A list without scores carries order only, so ranks become scores by a stated convention: the i-th of
  n listed heads (0-based) scores ``1 - 0.9 * i / n`` (1 for the first, just above 0.1 for the last) and
  unlisted heads 0. The numbers mean nothing beyond that order; they are chosen so that both ``threshold``
  (0.1) and ``top_k`` with k = n select exactly the listed heads.
- ``duoattention``: DuoAttention (Xiao et al. 2024, ``mit-han-lab/duo-attention``) ``full_attention_heads.tsv``:
  one row per layer, one tab-separated gate in [0, 1] per *KV* head (numpy ``savetxt``). Under GQA every query
  head shares its KV head's gate (DuoAttention expands it the same way). Trained gates are dense (most sit
  near 1), so DuoAttention itself keeps the heads at or above a quantile of the gates (``sparsify_attention_heads``,
  ``sparsity=0.5`` in its README); the importer does the same: heads below the ``quantile`` (default 0.5) score
  0, the others keep their gate, so threshold selection picks the retrieval-like half and ranks stay visible.

Every value except Wu's is one aggregate per head, not per-trial retrieval scores: ``FORMATS[name].per_trial``
tells the pre-flight report whether trial counts and the paper's sparsity references apply.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import ModelShape
from retrieval_heads.scores import Head, HeadScores

DUO_FILE = "full_attention_heads.tsv"  # DuoAttention's name inside attn_patterns/<model>/<run>/
DUO_DEFAULT_QUANTILE = 0.5  # DuoAttention's README: sparsity=0.5 (half the KV heads stream)
_HEAD = re.compile(r"^\s*(\d+)-(\d+)\s*$", re.ASCII)
_NOT_JSON = object()


@dataclass(frozen=True)
class HeadFormat:
    """One published head-score format: how to read it and how to recognise it."""

    name: str
    read: Callable[..., HeadScores]
    sniff: Callable[[Path, str | None, object], bool]
    per_trial: bool  # values are per-trial retrieval scores on Wu's scale
    options: tuple[str, ...] = ()


FORMATS: dict[str, HeadFormat] = {}


def _format(name: str, *, sniff, per_trial: bool, options: tuple[str, ...] = ()):
    def register(fn):
        FORMATS[name] = HeadFormat(name, fn, sniff, per_trial, options)
        return fn

    return register


def _known() -> str:
    return ", ".join(sorted(FORMATS)) + " (or auto)"


# --- wu -------------------------------------------------------------------------------------------

@_format("wu", sniff=lambda path, text, data: isinstance(data, dict), per_trial=True)
def read_wu(path: Path, shape: ModelShape | None = None) -> HeadScores:
    """Wu et al.'s JSON, read by ``HeadScores.load`` (whose validation every caller relies on)."""
    return HeadScores.load(path)


# --- qrhead ---------------------------------------------------------------------------------------

def _sniff_qrhead(path: Path, text: str | None, data: object) -> bool:
    if isinstance(data, list):
        return True
    if text is None or data is not _NOT_JSON:
        return False
    if path.suffix.lower() in (".yaml", ".yml"):
        return "attn_head_set" in text
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    return bool(tokens) and all(_HEAD.match(t) for t in tokens)


@_format("qrhead", sniff=_sniff_qrhead, per_trial=False)
def read_qrhead(path: Path, shape: ModelShape | None = None) -> HeadScores:
    """QRHead's detection output (``[["l-h", score], ...]``) or head set (YAML config, text or JSON list)."""
    entries = _qrhead_entries(path)
    if not entries:
        raise RetmaskError(
            f"QRHead file {path} lists no heads; expected [[\"layer-head\", score], ...] or \"l-h,l-h,...\""
        )
    seen: set[Head] = set()
    for head, _ in entries:
        if head in seen:
            raise RetmaskError(f"QRHead file {path}: head {head[0]}-{head[1]} is listed twice; keep one entry")
        seen.add(head)
    scored = [s is not None for _, s in entries]
    if any(scored) and not all(scored):
        raise RetmaskError(
            f"QRHead file {path} mixes heads with and without scores; give a score to every head or to none"
        )
    if shape is not None:
        outside = sorted(seen - set(_all_heads(shape)))
        if outside:
            raise RetmaskError(
                f"QRHead file {path} lists head {outside[0][0]}-{outside[0][1]}, outside this model's "
                f"{shape.num_layers} layers x {shape.num_heads} heads; use the heads found for this model"
            )
    if all(scored):
        grid = _grid_of(seen) if shape is None else _all_heads(shape)
        if len(seen) != len(grid):
            raise RetmaskError(
                f"QRHead file {path} scores {len(seen)} of the {len(grid)} heads; QRHead's detection scores every "
                "head: pass its whole output, or the head list without scores (ranks)"
            )
        return HeadScores({head: [score] for head, score in entries}, source=str(path))
    if shape is None:
        raise RetmaskError(
            f"QRHead file {path} lists {len(entries)} heads without scores; placing them among the model's other "
            "heads needs its shape: pass --model (or --shape)"
        )
    n = len(entries)
    trials = {head: [0.0] for head in _all_heads(shape)}
    for rank, (head, _) in enumerate(entries):
        trials[head] = [1.0 - 0.9 * rank / n]
    return HeadScores(trials, source=str(path))


def _qrhead_entries(path: Path) -> list[tuple[Head, float | None]]:
    text = _read_text(path, "QRHead file")
    data = _json_or_not(text)
    if data is _NOT_JSON and path.suffix.lower() in (".yaml", ".yml"):
        return _qrhead_config(path, text)
    if data is _NOT_JSON:  # the head set as the configs and the paper write it: "14-22,13-16,..."
        return [(_qrhead_head(t, path), None) for t in re.split(r"[,\s]+", text.strip()) if t]
    if not isinstance(data, list):
        raise RetmaskError(f"QRHead file {path} is JSON but not a list; expected [[\"layer-head\", score], ...]")
    return [_qrhead_item(item, i, path) for i, item in enumerate(data)]


def _qrhead_config(path: Path, text: str) -> list[tuple[Head, float | None]]:
    import yaml

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RetmaskError(f"QRHead config {path} is not readable YAML ({str(err).splitlines()[0]})") from None
    heads = config.get("attn_head_set") if isinstance(config, dict) else None
    if not isinstance(heads, str):
        raise RetmaskError(f"QRHead config {path} has no attn_head_set string; expected attn_head_set: \"l-h,l-h,...\"")
    if heads.strip() == "full_heads":
        raise RetmaskError(f"QRHead config {path} uses every head (attn_head_set: full_heads); it names no QRHead set")
    return [(_qrhead_head(t, path), None) for t in heads.split(",") if t.strip()]


def _qrhead_item(item: object, index: int, path: Path) -> tuple[Head, float | None]:
    """One list entry: "l-h", [l, h], ["l-h", score] or [l, h, score]."""
    if isinstance(item, str):
        return _qrhead_head(item, path), None
    if isinstance(item, list) and item and isinstance(item[0], str) and len(item) in (1, 2):
        return _qrhead_head(item[0], path), _score(item[1], index, path) if len(item) == 2 else None
    if isinstance(item, list) and len(item) in (2, 3) and all(_whole(v) for v in item[:2]):
        return (int(item[0]), int(item[1])), _score(item[2], index, path) if len(item) == 3 else None
    raise RetmaskError(
        f"QRHead file {path}: entry {index} is {json.dumps(item)[:40]}, not \"layer-head\", [layer, head] or "
        "[\"layer-head\", score]; fix that entry"
    )


def _qrhead_head(token: str, path: Path) -> Head:
    match = _HEAD.match(token)
    if not match:
        raise RetmaskError(f"QRHead file {path}: {token.strip()[:40]!r} is not 'layer-head' (e.g. '14-22')")
    return int(match.group(1)), int(match.group(2))


def _score(value: object, index: int, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RetmaskError(f"QRHead file {path}: entry {index} has score {json.dumps(value)[:40]}, not a finite number")
    return float(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- duoattention ---------------------------------------------------------------------------------

def _sniff_duo(path: Path, text: str | None, data: object) -> bool:
    if path.is_dir():
        return (path / DUO_FILE).is_file()
    if path.suffix.lower() == ".tsv":
        return True
    if text is None or data is not _NOT_JSON or not text.strip():
        return False
    try:
        [float(v) for line in text.strip().splitlines() for v in line.split("\t")]
    except ValueError:
        return False
    return True


@_format("duoattention", sniff=_sniff_duo, per_trial=False, options=("quantile",))
def read_duoattention(
    path: Path, shape: ModelShape | None = None, quantile: float = DUO_DEFAULT_QUANTILE
) -> HeadScores:
    """A DuoAttention gate pattern (the TSV or its run directory), KV-head gates spread over their query heads."""
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 <= quantile < 1:
        raise RetmaskError(
            f"quantile must be a number from 0 to below 1 (DuoAttention uses 0.5), got {quantile!r}; "
            "0 keeps every gate"
        )
    tsv = path / DUO_FILE if path.is_dir() else path
    if path.is_dir() and not tsv.is_file():
        raise RetmaskError(f"directory {path} has no {DUO_FILE}; point at DuoAttention's attn_patterns/<model>/<run>/")
    gates = _read_gates(tsv)
    if shape is None:
        raise RetmaskError(
            f"DuoAttention file {tsv} holds one gate per KV head; mapping them to query heads needs the model's "
            "GQA grouping: pass --model (or --shape)"
        )
    layers, kv_heads = gates.shape
    if layers != shape.num_layers or kv_heads != shape.num_kv_heads:
        raise RetmaskError(
            f"DuoAttention file {tsv} has {layers} layers x {kv_heads} KV heads but the model has "
            f"{shape.num_layers} x {shape.num_kv_heads}; use the pattern trained for this model"
        )
    if shape.num_heads % shape.num_kv_heads:
        raise RetmaskError(
            f"model shape has {shape.num_heads} query heads, not a multiple of {shape.num_kv_heads} KV heads"
        )
    # ties at the cutoff count as retrieval heads (DuoAttention breaks them with random noise instead)
    cutoff = float(np.quantile(gates, quantile))
    kept = np.where(gates >= cutoff, gates, 0.0)
    group = shape.num_heads // shape.num_kv_heads  # query head h reads KV head h // group
    trials = {(l, h): [float(kept[l, h // group])] for l in range(layers) for h in range(shape.num_heads)}
    return HeadScores(trials, source=str(tsv))


def _read_gates(path: Path) -> np.ndarray:
    text = _read_text(path, "DuoAttention file")
    rows: list[list[float]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = []
        for column, cell in enumerate(line.strip().split("\t")):
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise RetmaskError(
                    f"DuoAttention file {path}: row {number} column {column} is {cell.strip()[:40]!r}, not a finite "
                    "number; the file holds one tab-separated gate per KV head"
                )
            row.append(value)
        if rows and len(row) != len(rows[0]):
            raise RetmaskError(f"DuoAttention file {path}: row {number} has {len(row)} gates, row 1 has {len(rows[0])}")
        rows.append(row)
    if not rows:
        raise RetmaskError(f"DuoAttention file {path} is empty; expected one row of KV-head gates per layer")
    return np.clip(np.array(rows, dtype=np.float64), 0.0, 1.0)  # as DuoAttention's load_attn_pattern


# --- shared ---------------------------------------------------------------------------------------

def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise RetmaskError(f"{what} {path} does not exist; fix the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RetmaskError(f"{what} {path} is not readable text ({err})") from None


def _json_or_not(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _NOT_JSON


def _all_heads(shape: ModelShape) -> list[Head]:
    return [(l, h) for l in range(shape.num_layers) for h in range(shape.num_heads)]


def _grid_of(heads: set[Head]) -> list[Head]:
    """The full layers x heads grid these heads span (a scored file is expected to cover it)."""
    layers = 1 + max(l for l, _ in heads)
    per_layer = 1 + max(h for _, h in heads)
    return [(l, h) for l in range(layers) for h in range(per_layer)]


def resolve_format(path: str | Path, format: str = "auto") -> str:
    """The registered format name for ``path``: ``format`` itself, or the one format its content fits."""
    path = Path(path)
    if format != "auto":
        if format not in FORMATS:
            raise RetmaskError(f"unknown head-score format {format!r}; known formats: {_known()}")
        return format
    if not path.exists():
        raise RetmaskError(f"head-score file {path} does not exist; fix the path")
    text = None if path.is_dir() else _read_text(path, "head-score file")
    data = _NOT_JSON if text is None else _json_or_not(text)
    fits = [name for name, fmt in FORMATS.items() if fmt.sniff(path, text, data)]
    if len(fits) != 1:
        why = "fits none of" if not fits else f"could be any of {', '.join(sorted(fits))} among"
        raise RetmaskError(
            f"cannot tell the format of {path}: it {why} the known formats; pass --format, one of {_known()}"
        )
    return fits[0]


def load_head_scores(path: str | Path, format: str = "auto", shape: ModelShape | None = None, **options) -> HeadScores:
    """Read a head-score file of any registered format (``auto``: by content) and check it against ``shape``."""
    path = Path(path)
    name = resolve_format(path, format)
    fmt = FORMATS[name]
    unknown = sorted(set(options) - set(fmt.options))
    if unknown:
        allowed = ", ".join(fmt.options) or "none"
        raise RetmaskError(
            f"option {', '.join(unknown)} does not apply to head-score format {name} (its options: {allowed})"
        )
    if not path.exists():
        raise RetmaskError(f"head-score file {path} does not exist; fix the path")
    scores = fmt.read(path, shape=shape, **options)
    if shape is not None:
        scores.check_shape(shape)
    return scores
