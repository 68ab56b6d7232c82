"""``retmask heads``: head scores from other methods (QRHead, DuoAttention, Wu): import, compare, pre-flight.

The conversions live in ``retrieval_heads.importers``, the statistics in ``retrieval_heads.compare`` and
``retrieval_heads.preflight``; these commands read files, print the report and write atomically.
"""

from __future__ import annotations

import typer

from retrieval_heads.errors import RetmaskError

heads_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Head scores from other methods: import them, compare them, check them before masking.")
_FORMAT_HELP = "wu | qrhead | duoattention | auto (by content)"
_MODEL_HELP = "model whose shape places the heads (DuoAttention's KV gates, QRHead head lists)"
_SHAPE_HELP = "LAYERSxHEADSxKV_HEADS instead of --model, e.g. 32x32x8 for Llama-3.1-8B"
_QUANTILE_HELP = "DuoAttention: gates below this quantile score 0 (default 0.5, as DuoAttention)"


def _head_shape(model: str | None, shape: str | None):
    """The model shape from --model (its config.json only) or --shape; None when neither is given."""
    from retrieval_heads.models import ModelShape, model_shape

    if model and shape:
        raise RetmaskError("give --model or --shape, not both")
    if model:
        return model_shape(model)
    if shape is None:
        return None
    try:
        layers, heads, kv_heads = (int(p) for p in shape.lower().split("x"))
    except ValueError:
        raise RetmaskError(f"--shape {shape!r} is not LAYERSxHEADSxKV_HEADS (e.g. 32x32x8)") from None
    if min(layers, heads, kv_heads) < 1 or heads % kv_heads:
        raise RetmaskError(f"--shape {shape!r}: counts must be positive and heads a multiple of KV heads")
    return ModelShape(layers, heads, kv_heads, head_dim=0, max_position_embeddings=0)


def _load_heads(path: str, fmt: str, shape, quantile: float | None, strict: bool = True):
    """(scores, per_trial) of one file; ``--quantile`` goes to the formats that take it (all of them if strict)."""
    from retrieval_heads.importers import FORMATS, load_head_scores, resolve_format

    name = resolve_format(path, fmt)
    takes = "quantile" in FORMATS[name].options
    options = {"quantile": quantile} if quantile is not None and (strict or takes) else {}
    return load_head_scores(path, name, shape, **options), FORMATS[name].per_trial


def _write_atomically(target, write) -> None:
    """:func:`retrieval_heads.files.write_atomically`, with a file system error as a user error."""
    from retrieval_heads.files import write_atomically

    try:
        write_atomically(target, write)
    except OSError as err:
        raise RetmaskError(f"cannot write {target} ({err.strerror or err}); choose another --out") from None


@heads_app.command("import")
def heads_import(
    file: str = typer.Argument(..., help="head-score file, or a DuoAttention run directory"),
    fmt: str = typer.Option("auto", "--format", help=_FORMAT_HELP),
    model: str = typer.Option(None, help=_MODEL_HELP),
    shape: str = typer.Option(None, help=_SHAPE_HELP),
    quantile: float = typer.Option(None, help=_QUANTILE_HELP),
    out: str = typer.Option("head_scores.json", help="Wu JSON to write (what --scores reads)"),
):
    """Convert another method's head scores to Wu JSON and print the pre-flight report."""
    from retrieval_heads.preflight import format_preflight, preflight

    scores, per_trial = _load_heads(file, fmt, _head_shape(model, shape), quantile)
    _write_atomically(out, scores.save)
    print(format_preflight(preflight(scores, per_trial=per_trial)))
    print(f"wrote {out} ({len(scores.trials)} heads, Wu JSON)")


@heads_app.command("compare")
def heads_compare(
    files: list[str] = typer.Argument(..., help="two or more head-score files; each is compared with the first"),
    fmt: str = typer.Option("auto", "--format", help="one format for every file, or one per file, comma-separated"),
    model: str = typer.Option(None, help=_MODEL_HELP),
    shape: str = typer.Option(None, help=_SHAPE_HELP),
    quantile: float = typer.Option(None, help=_QUANTILE_HELP),
    k: str = typer.Option("5,10,20", help="top-k sizes of the overlap"),
    out: str = typer.Option("runs/heads_compare", help="directory for compare.json and compare.png"),
):
    """Overlap@k, rank correlation and score mass per layer of head-score files of one shape; side-by-side heatmap."""
    import json

    from jobs.cli import parse_ints
    from retrieval_heads.compare import compare_many, format_compare, plot_compare

    if len(files) < 2:
        raise RetmaskError(f"heads compare needs at least two files, got {len(files)}")
    formats = [f.strip() for f in fmt.split(",")]
    if len(formats) == 1:
        formats *= len(files)
    if len(formats) != len(files):
        raise RetmaskError(f"--format gives {len(formats)} formats for {len(files)} files; give one, or one per file")
    head_shape = _head_shape(model, shape)
    loaded = [_load_heads(f, name, head_shape, quantile, strict=False)[0] for f, name in zip(files, formats)]
    result = compare_many(loaded, parse_ints(k))
    _write_atomically(f"{out}/compare.json", lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    labels = [f if len(f) <= 40 else "..." + f[-37:] for f in files]
    ks = result["ks"]
    _write_atomically(f"{out}/compare.png", lambda p: plot_compare(loaded, p, labels, k=ks[len(ks) // 2]))
    print(format_compare(result))
    print(f"wrote {out}/compare.json, {out}/compare.png")


@heads_app.command("preflight")
def heads_preflight(
    file: str = typer.Argument(..., help="head-score file, or a DuoAttention run directory"),
    fmt: str = typer.Option("auto", "--format", help=_FORMAT_HELP),
    model: str = typer.Option(None, help=_MODEL_HELP),
    shape: str = typer.Option(None, help=_SHAPE_HELP),
    quantile: float = typer.Option(None, help=_QUANTILE_HELP),
    threshold: float = typer.Option(0.1, help="selection threshold the report counts heads against"),
):
    """Sparsity, counted trials and warnings for a head-score file, before masking by it (warnings exit 0)."""
    from retrieval_heads.preflight import format_preflight, preflight

    scores, per_trial = _load_heads(file, fmt, _head_shape(model, shape), quantile)
    print(format_preflight(preflight(scores, threshold, per_trial=per_trial)))
