"""The ``retmask`` command line: one thin command per stage, its options derived from the stage's config.

Every stage's options come from its dataclass (``retrieval_heads.config.cli_options``): name, type, help
and the default shown in ``--help`` are written once, in the dataclass. ``--config`` reads a YAML of the
same fields (``jobs/configs/``); a flag given on the command line wins over the YAML, which wins over the
dataclass. The work itself is in the stage's recipe (``jobs/<stage>.py``) or library function.
"""

from __future__ import annotations

import json
import logging

import typer

from jobs.demo import DemoConfig
from jobs.generate import PlanTarget
from jobs.study import StudyConfig
from jobs.train import RayWorkers
from pipeline.evaluation.config import EvalConfig
from pipeline.export import ExportConfig
from pipeline.generate import GenerateConfig
from pipeline.serve import ServeConfig
from retrieval_heads.ablation import AblationConfig
from retrieval_heads.config import cli_options, load_config, take_config
from retrieval_heads.detect import DetectConfig
from retrieval_heads.errors import RetmaskError, run_cli
from retrieval_heads.masking import MaskExportConfig
from trainer.config import TrainConfig

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RetMask: retrieval-head masking as a preference signal.")


def _config_option(stage: str, example: str) -> typer.Option:
    return typer.Option(None, "--config", help=f"YAML of {stage} fields (e.g. {example}); flags win over it")


def parse_ints(text: str) -> tuple[int, ...]:
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
@cli_options(DetectConfig, flags={"num_needles": "--needles"})
def detect(config: str = _config_option("DetectConfig", "jobs/configs/detect.yaml"),
           out: str = typer.Option("runs/detect", help="output directory"), *, overrides: dict):
    """Detect retrieval heads (Wu et al. retrieval score) and write head_scores.json + heatmap."""
    from jobs.detect import run
    from retrieval_heads.preflight import format_preflight, preflight

    scores = run(load_config(DetectConfig, config, **overrides), out)
    top = ", ".join(f"{layer}-{head} ({s:.3f})" for (layer, head), s in scores.ranked()[:5])
    print(f"{scores.num_trials()} counted trials; {scores.sparsity()['share_above_threshold']:.1%} of heads > 0.1; "
          f"top: {top}")
    print(format_preflight(preflight(scores)))
    print(f"wrote {out}/head_scores.json, trials.jsonl, summary.json, head_scores.png")


@cli.command()
@cli_options(AblationConfig, flags={"num_needles": "--needles"})
def ablate(config: str = _config_option("AblationConfig", "jobs/configs/ablate.yaml"),
           out: str = typer.Option("runs/ablate", help="output directory"), *, overrides: dict):
    """NIAH accuracy with the top-K retrieval heads masked vs K random heads."""
    from retrieval_heads.ablation import run_ablation

    for row in run_ablation(load_config(AblationConfig, config, **overrides), out):
        print(f"{row['condition']:>24}: {row['accuracy']:.2f}  {row['heads']}")
    print(f"wrote {out}/ablation.md, ablation.json, ablation.png")


@cli.command("export-masked")
@cli_options(MaskExportConfig, required=("scores", "out"))
def export_masked(config: str = _config_option("MaskExportConfig", "jobs/configs/export_masked.yaml"), *,
                  overrides: dict):
    """Write a static checkpoint with the selected heads' o_proj input columns zeroed (RetMask-compatible)."""
    from retrieval_heads.masking import export_masked_checkpoint, select_mask
    from retrieval_heads.models import model_shape, resolve_model

    cfg = load_config(MaskExportConfig, config, **overrides)
    mask = select_mask(cfg.scores, cfg.strategy, model_shape(cfg.model), threshold=cfg.threshold, k=cfg.k,
                       seed=cfg.seed)
    export_masked_checkpoint(resolve_model(cfg.model), mask, cfg.out)
    print(f"masked {len(mask)} heads ({mask.spec()}) -> {cfg.out}")


_GENERATE_FLAGS = {"max_prompts": "--num-prompts", "sampling.max_tokens": "--max-tokens"}
_SAMPLING = ("sampling.max_tokens", "sampling.temperature")


@cli.command()
@cli_options(GenerateConfig, also=_SAMPLING, flags=_GENERATE_FLAGS)
def generate(config: str = _config_option("GenerateConfig", "jobs/configs/demo.yaml"),
             as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON line (job logs)"), *,
             overrides: dict):
    """Generate normal and head-masked responses for every prompt, as Parquet preference shards."""
    from jobs.generate import run

    s = run(load_config(GenerateConfig, config, **overrides))
    if as_json:
        print(json.dumps(s))
        return
    rejected = sum(s["rejected"].values())
    print(f"{s['rows_written']} prompts generated ({s['rows_total']} in {s['shards']} shards, {s['already_committed']} "
          f"were already there), {rejected} rejected; {s['prompts_per_s']} prompts/s, {s['tokens_per_s']} tokens/s")
    print(f"wrote {s['out']} (inspect it: retmask inspect OUT)")  # redacted: a URI may carry credentials


@cli.command("plan")
@cli_options(PlanTarget)
@cli_options(GenerateConfig, also=_SAMPLING, flags=_GENERATE_FLAGS)
def plan_cmd(config: str = _config_option("GenerateConfig", "jobs/configs/generate_llama31_8b.yaml"), *,
             overrides: dict):
    """Check a generation config against the model's config.json alone (no weights, no engine); exit 1 on problems."""
    from jobs.generate import dry_run
    from pipeline.plan import format_plan

    target = take_config(PlanTarget, overrides)
    report = dry_run(load_config(GenerateConfig, config, **overrides), target)
    print(format_plan(report))
    if report.problems:
        raise RetmaskError(report.summary())


@cli.command("export-pairs")
@cli_options(ExportConfig)
def export_pairs_cmd(
    out: str = typer.Argument(..., help="output directory or URI of `retmask generate`"),
    to: str = typer.Option(..., "--to", help="local directory for the dataset (new or empty)"),
    config: str = _config_option("ExportConfig", "jobs/configs/export_pairs.yaml"), *, overrides: dict,
):
    """Write the filtered pairs as a preference dataset for TRL, OpenRLHF, LLaMA-Factory or the Hub."""
    from pipeline.export import export_pairs

    cfg = load_config(ExportConfig, config, **overrides)
    s = export_pairs(out, to, chosen=cfg.chosen, rejected=cfg.rejected, fmt=cfg.format,
                     drop_truncated=not cfg.keep_truncated, max_tokens=cfg.max_tokens, text=cfg.text,
                     test_fraction=cfg.test_fraction, overwrite=cfg.overwrite)
    removed = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in s["removed"].items())
    splits = ", ".join(f"{s[name]} {name}" for name in ("train", "test") if name in s)
    print(f"{s['kept']} {cfg.chosen}/{cfg.rejected} pairs ({splits}) of {s['rows']} rows; removed: {removed}")
    print(f"wrote {to} (README.md has the provenance; load it: datasets.load_dataset({to!r}))")


@cli.command("inspect")
def inspect_cmd(
    out: str = typer.Argument(..., help="output directory or URI of `retmask generate`"),
    plots: str = typer.Option(None, help="directory for the length histograms"),
    samples: int = typer.Option(3, help="sample rows shown side by side"),
):
    """Statistics, samples and validation of a generation output; exit code 1 if it has problems."""
    from pipeline.inspect import format_report, inspect_run

    report = inspect_run(out, plots_dir=plots, num_samples=samples)
    print(format_report(report))
    if report["problems"]:
        raise typer.Exit(1)


_TRAIN_FLAGS = {"output_dir": "--out", "lora": "--lora/--full",
                "precompute_ref_log_probs": "--precompute-ref/--live-ref"}


@cli.command()
@cli_options(RayWorkers)
@cli_options(TrainConfig, flags=_TRAIN_FLAGS, required=("pairs",))
def train(config: str = _config_option("TrainConfig", "jobs/configs/train_paper.yaml; its `preset` picks the base"),
          *, overrides: dict):
    """DPO (TRL) on preference shards; writes final/, metrics.json and curves.png."""
    from jobs.train import run

    workers = take_config(RayWorkers, overrides)
    cfg = TrainConfig.load(config, **overrides)
    final = run(cfg, workers)
    print(f"wrote {final} (metrics: {cfg.output_dir}/metrics.json, curves: {cfg.output_dir}/curves.png)")


@cli.command("eval")
@cli_options(EvalConfig, exclude=("models",), flags={"samples_per_cell": "--samples"})
def eval_cmd(
    config: str = _config_option("EvalConfig", "jobs/configs/eval.yaml"),
    models: str = typer.Option(None, help="name=model pairs, comma-separated; the first is the baseline "
                               "[default: base=smollm2-135m-instruct]"),
    out: str = typer.Option("runs/eval", help="output directory"), *, overrides: dict,
):
    """Synthetic long-context suite through vLLM; paired comparison of checkpoints against the first."""
    from jobs.eval import run
    from pipeline.evaluation.config import parse_models

    cfg = load_config(EvalConfig, config, **overrides, models=parse_models(models) if models else None)
    run(cfg, out)
    print(f"wrote {out}/results.json, results.md and plots")


_SERVE_ENGINE = ("engine.dtype", "engine.enforce_eager", "engine.kv_cache_memory_bytes", "engine.max_num_seqs",
                 "engine.enable_prefix_caching", "engine.cpu_reserved_cores", "engine.gate_canary")


@cli.command()
@cli_options(ServeConfig, also=_SERVE_ENGINE)
def serve(config: str = _config_option("ServeConfig", "jobs/configs/serve.yaml"), *, overrides: dict):
    """OpenAI-compatible server (vLLM's own) on one gated engine: the plain model and each head mask by name."""
    from jobs.serve import run

    raise typer.Exit(run(load_config(ServeConfig, config, **overrides)))


@cli.command()
@cli_options(DemoConfig, flags={"train_control": "--control", "num_prompts": "--prompts"})
def demo(config: str = _config_option("DemoConfig", "jobs/configs/demo_run.yaml"), *, overrides: dict):
    """The whole RetMask loop on the embedded model; writes OUT/REPORT.md."""
    from jobs.demo import run_demo

    print(f"report: {run_demo(load_config(DemoConfig, config, **overrides))}")


@cli.command()
@cli_options(StudyConfig)
def study(config: str = _config_option("StudyConfig", "jobs/configs/study.yaml, the pre-registered study"), *,
          overrides: dict):
    """The pre-registered RetMask vs control study (docs/STUDY.md); writes OUT/RESULTS.md. Rerun to resume."""
    from jobs.study import run

    print(f"results: {run(load_config(StudyConfig, config, **overrides))}")


def _heads_app() -> typer.Typer:
    from jobs.heads import heads_app

    return heads_app


cli.add_typer(_heads_app(), name="heads")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI under the run contract (``retrieval_heads.errors``): exit 0 / 1 user error / 2 usage /
    130 Ctrl-C / 143 SIGTERM. ``python -m jobs.<stage>`` calls this with its own command prepended."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Standalone mode: typer prints usage errors and exits 2, turns Ctrl-C into exit 130 and honours
    # typer.Exit codes; RetmaskError passes through to run_cli, which prints it as one line.
    run_cli(lambda: cli(args=argv, prog_name="retmask", standalone_mode=True))


app = main  # the console script `retmask` (pyproject.toml)

if __name__ == "__main__":
    main()
