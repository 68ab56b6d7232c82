"""The ``retmask`` command line: one thin command per stage."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict

import typer

from retrieval_heads.errors import RetmaskError

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="RetMask: retrieval-head masking as a preference signal.")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RetmaskError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RetmaskError(f"expected comma-separated integers, got {text!r}") from None


@cli.command("fetch-model")
def fetch_model(model: str = typer.Option("smollm2-135m-instruct", help="alias, local checkpoint or hub id")):
    """Build (once) and print the local path of a model."""
    from retrieval_heads.models import resolve_model

    print(resolve_model(model))


@cli.command()
def detect(
    model: str = typer.Option("smollm2-135m-instruct", help="alias, local checkpoint or hub id"),
    out: str = typer.Option("runs/detect", help="output directory"),
    lengths: str = typer.Option("500,1000,2000,4000", help="context lengths in tokens"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle depths, 0 = start, 1 = end"),
    needles: int = typer.Option(3, help="number of built-in needles"),
    max_new_tokens: int = typer.Option(50),
    dtype: str = typer.Option("float32", help="float32 (exact ties) or bfloat16"),
    device: str = typer.Option("cpu"),
):
    """Detect retrieval heads (Wu et al. retrieval score) and write head_scores.json + heatmap."""
    from retrieval_heads.detect import DetectConfig, detect as run_detect

    config = DetectConfig(model=model, lengths=_ints(lengths), depths=_floats(depths), num_needles=needles,
                          max_new_tokens=max_new_tokens, dtype=dtype, device=device)
    scores = run_detect(config, out)
    sparsity = scores.sparsity()
    top = ", ".join(f"{l}-{h} ({s:.3f})" for (l, h), s in scores.ranked()[:5])
    print(f"{scores.num_trials()} counted trials; {sparsity['share_above_threshold']:.1%} of heads > 0.1; top: {top}")
    print(f"wrote {out}/head_scores.json, trials.jsonl, summary.json, head_scores.png")


@cli.command()
def ablate(
    scores: str = typer.Option("runs/detect/head_scores.json", help="head score file (Wu JSON format)"),
    model: str = typer.Option("smollm2-135m-instruct"),
    out: str = typer.Option("runs/ablate"),
    k: int = typer.Option(5, help="number of heads masked per condition"),
    seeds: str = typer.Option("0,1,2", help="seeds of the random-head controls"),
    lengths: str = typer.Option("1000,2000"),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9"),
    needles: int = typer.Option(2),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
):
    """NIAH accuracy with the top-K retrieval heads masked vs K random heads."""
    from retrieval_heads.ablation import AblationConfig, run_ablation

    config = AblationConfig(model=model, scores=scores, k=k, seeds=_ints(seeds), lengths=_ints(lengths),
                            depths=_floats(depths), num_needles=needles, dtype=dtype, device=device)
    table = run_ablation(config, out)
    for row in table:
        print(f"{row['condition']:>24}: {row['accuracy']:.2f}  {row['heads']}")
    print(f"wrote {out}/ablation.md, ablation.json, ablation.png")


@cli.command("export-masked")
def export_masked(
    scores: str = typer.Option(..., help="head score file"),
    out: str = typer.Option(..., help="directory for the masked checkpoint"),
    model: str = typer.Option("smollm2-135m-instruct"),
    strategy: str = typer.Option("threshold", help="threshold | top_k | random_nonretrieval | random_all"),
    threshold: float = typer.Option(0.1),
    k: int = typer.Option(5),
    seed: int = typer.Option(0),
):
    """Write a static checkpoint with the selected heads' o_proj input columns zeroed (RetMask-compatible)."""
    from retrieval_heads.masking import HeadMask, export_masked_checkpoint
    from retrieval_heads.models import model_shape, resolve_model
    from retrieval_heads.scores import HeadScores, select_heads

    shape = model_shape(model)
    head_scores = HeadScores.load(scores)
    head_scores.check_shape(shape)
    mask = HeadMask.for_shape(select_heads(head_scores, strategy, threshold=threshold, k=k, seed=seed), shape)
    export_masked_checkpoint(resolve_model(model), mask, out)
    print(f"masked {len(mask)} heads ({mask.spec()}) -> {out}")


@cli.command()
def demo(out: str = typer.Option("runs/demo", help="output directory (rerun to resume)")):
    """The whole RetMask loop on the embedded model; writes OUT/REPORT.md."""
    from jobs.demo import DemoConfig, run_demo

    print(f"report: {run_demo(DemoConfig(out=out))}")


def app() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cli(standalone_mode=False)
    except RetmaskError as err:
        print(f"retmask: error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    app()
