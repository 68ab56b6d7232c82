"""The ``retmask`` command line: one thin command per stage."""

from __future__ import annotations

import json
import logging

import typer

from retrieval_heads.errors import RetmaskError, run_cli

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="RetMask: retrieval-head masking as a preference signal.")


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
    chat_template_kwargs: str = typer.Option(None, help='JSON for the chat template, e.g. \'{"enable_thinking": true}\' '
                                             "(default: thinking off, as RetMask detects)"),
):
    """Detect retrieval heads (Wu et al. retrieval score) and write head_scores.json + heatmap."""
    from retrieval_heads.detect import DetectConfig
    from retrieval_heads.detect import detect as run_detect

    template = {}
    if chat_template_kwargs:
        try:
            template = {"chat_template_kwargs": json.loads(chat_template_kwargs)}
        except json.JSONDecodeError as err:
            raise RetmaskError(f"--chat-template-kwargs is not JSON ({err}); e.g. '{{\"enable_thinking\": true}}'") from None

    config = DetectConfig(model=model, lengths=_ints(lengths), depths=_floats(depths), num_needles=needles,
                          max_new_tokens=max_new_tokens, dtype=dtype, device=device, **template)
    scores = run_detect(config, out)
    sparsity = scores.sparsity()
    top = ", ".join(f"{l}-{h} ({s:.3f})" for (l, h), s in scores.ranked()[:5])
    print(f"{scores.num_trials()} counted trials; {sparsity['share_above_threshold']:.1%} of heads > 0.1; top: {top}")
    from retrieval_heads.preflight import format_preflight, preflight

    print(format_preflight(preflight(scores)))
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
    batch_size: int = typer.Option(8, help="prompts decoded together (left-padded)"),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
):
    """NIAH accuracy with the top-K retrieval heads masked vs K random heads."""
    from retrieval_heads.ablation import AblationConfig, run_ablation

    config = AblationConfig(model=model, scores=scores, k=k, seeds=_ints(seeds), lengths=_ints(lengths),
                            depths=_floats(depths), num_needles=needles, batch_size=batch_size, dtype=dtype,
                            device=device)
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
def generate(
    config: str = typer.Option(None, help="YAML of GenerateConfig fields; default: the packaged jobs/configs/demo.yaml"),
    model: str = typer.Option(None, help="alias, local checkpoint or hub id"),
    prompts_source: str = typer.Option(None, help="jsonl | parquet | hf_dataset | lmsys | builtin"),
    prompts: str = typer.Option(None, help="prompt file or directory"),
    scores: str = typer.Option(None, help="head score file (Wu JSON) detected on this model"),
    out: str = typer.Option(None, help="output directory or URI (rerun to resume)"),
    num_prompts: int = typer.Option(None, help="use the first N valid prompts"),
    max_tokens: int = typer.Option(None, help="response token limit"),
    num_actors: int = typer.Option(None, help="engines (GPUs / tensor parallel size on a cluster)"),
    variants: str = typer.Option(None, help="comma-separated: normal,retrieval_masked[,random_masked]"),
    strict: bool = typer.Option(None, "--strict/--no-strict", help="stop at a bad prompt row instead of recording it"),
):
    """Generate normal and head-masked responses for every prompt, as Parquet preference shards."""
    from importlib import resources

    from pipeline.generate import GenerateConfig
    from pipeline.generate import generate as run_generate

    path = config or str(resources.files("jobs") / "configs" / "demo.yaml")
    cfg = GenerateConfig.from_yaml(
        path, model=model, prompts_source=prompts_source, prompts=prompts, scores=scores, out=out,
        max_prompts=num_prompts, num_actors=num_actors, strict=strict,
        variants=[v.strip() for v in variants.split(",") if v.strip()] if variants else None,
        sampling={"max_tokens": max_tokens} if max_tokens is not None else None,
    )
    s = run_generate(cfg)
    rejected = sum(s["rejected"].values())
    print(f"{s['rows_written']} prompts generated ({s['rows_total']} in {s['shards']} shards, {s['already_committed']} were "
          f"already there), {rejected} rejected; {s['prompts_per_s']} prompts/s, {s['tokens_per_s']} tokens/s")
    print(f"wrote {s['out']} (inspect it: retmask inspect OUT)")  # redacted: a URI may carry credentials


@cli.command("export-pairs")
def export_pairs_cmd(
    out: str = typer.Argument(..., help="output directory or URI of `retmask generate`"),
    to: str = typer.Option(..., "--to", help="local directory for the dataset (new or empty)"),
    chosen: str = typer.Option("normal", help="variant of the chosen answers"),
    rejected: str = typer.Option("retrieval_masked", help="variant of the rejected answers"),
    fmt: str = typer.Option("parquet", "--format", help="parquet | jsonl"),
    text: bool = typer.Option(False, "--text", help="also write plain-text pairs (config `text`, LLaMA-Factory)"),
    keep_truncated: bool = typer.Option(False, "--keep-truncated", help="keep pairs that hit the token limit"),
    max_tokens: int = typer.Option(None, help="drop pairs with a response longer than this many tokens"),
    test_fraction: float = typer.Option(0.0, help="share held out as split `test` (prompt-id hash, like train)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --to directory (a previous export)"),
):
    """Write the filtered pairs as a preference dataset for TRL, OpenRLHF, LLaMA-Factory or the Hub."""
    from pipeline.export import export_pairs

    s = export_pairs(out, to, chosen=chosen, rejected=rejected, fmt=fmt, drop_truncated=not keep_truncated,
                     max_tokens=max_tokens, text=text, test_fraction=test_fraction, overwrite=overwrite)
    removed = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in s["removed"].items())
    splits = ", ".join(f"{s[name]} {name}" for name in ("train", "test") if name in s)
    print(f"{s['kept']} {chosen}/{rejected} pairs ({splits}) of {s['rows']} rows; removed: {removed}")
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


@cli.command("plan")
def plan_cmd(
    config: str = typer.Option(None, help="YAML of GenerateConfig fields (e.g. jobs/configs/generate_llama31_8b.yaml)"),
    model: str = typer.Option(None, help="alias, local directory with config.json (tokenizer optional), or hub id"),
    prompts_source: str = typer.Option(None, help="jsonl | parquet | hf_dataset | lmsys | builtin"),
    prompts: str = typer.Option(None, help="prompt file or directory"),
    scores: str = typer.Option(None, help="head score file (Wu JSON) detected on this model"),
    out: str = typer.Option(None, help="output directory or URI of the run (nothing is written there)"),
    tensor_parallel_size: int = typer.Option(None, help="GPUs per engine"),
    num_actors: int = typer.Option(None, help="engines"),
    gpu_memory_gb: float = typer.Option(80.0, help="memory of one GPU in GiB (80 for an A100/H100 80GB)"),
    gpus_per_node: int = typer.Option(8, help="GPUs per cluster node"),
    max_rows: int = typer.Option(10_000, help="prompt rows scanned; 0 = the whole source"),
):
    """Check a generation config against the model's config.json alone (no weights, no engine); exit 1 on problems."""
    from importlib import resources

    from pipeline.generate import GenerateConfig
    from pipeline.plan import format_plan
    from pipeline.plan import plan as run_plan

    path = config or str(resources.files("jobs") / "configs" / "demo.yaml")
    cfg = GenerateConfig.from_yaml(path, model=model, prompts_source=prompts_source, prompts=prompts, scores=scores,
                                   out=out, tensor_parallel_size=tensor_parallel_size, num_actors=num_actors)
    report = run_plan(cfg, gpu_memory_gb=gpu_memory_gb, gpus_per_node=gpus_per_node, max_rows=max_rows or None)
    print(format_plan(report))
    if report.problems:
        raise RetmaskError(report.summary())


@cli.command()
def train(
    pairs: str = typer.Option(..., help="shard directory from `retmask generate`"),
    model: str = typer.Option(None, help="alias, local checkpoint or hub id of the policy"),
    preset: str = typer.Option("paper", help="paper (the RetMask recipe) | demo (CPU-sized)"),
    config: str = typer.Option(None, help="YAML of TrainConfig fields (its `preset` key picks the base)"),
    out: str = typer.Option(None, help="output directory (rerun to resume)"),
    chosen: str = typer.Option(None, help="preferred variant (default normal)"),
    rejected: str = typer.Option(None, help="dispreferred variant (default retrieval_masked; random_masked = control)"),
    lora: bool = typer.Option(None, "--lora/--full", help="LoRA adapter instead of a full fine-tune"),
    precompute_ref: bool = typer.Option(None, "--precompute-ref/--live-ref", help="score the reference once, then free it"),
    max_steps: int = typer.Option(None, help="stop after this many optimizer steps"),
    learning_rate: float = typer.Option(None),
    seed: int = typer.Option(None),
    allow_off_policy: bool = typer.Option(None, "--allow-off-policy", help="train on pairs another model generated"),
):
    """DPO (TRL) on preference shards; writes final/, metrics.json and curves.png."""
    from trainer.config import TrainConfig
    from trainer.dpo import train as run_train

    overrides = dict(pairs=pairs, model=model, output_dir=out, chosen=chosen, rejected=rejected, lora=lora,
                     precompute_ref_log_probs=precompute_ref, max_steps=max_steps, learning_rate=learning_rate, seed=seed,
                     allow_off_policy=allow_off_policy)
    cfg = TrainConfig.from_yaml(config, **overrides) if config else TrainConfig.from_preset(preset, **overrides)
    final = run_train(cfg)
    print(f"wrote {final} (metrics: {cfg.output_dir}/metrics.json, curves: {cfg.output_dir}/curves.png)")


@cli.command("eval")
def eval_cmd(
    models: str = typer.Option("base=smollm2-135m-instruct", help="name=model pairs, comma-separated; the first is the baseline"),
    out: str = typer.Option("runs/eval", help="output directory"),
    lengths: str = typer.Option(None, help="context lengths in tokens (default 1000,2000,4000,8000)"),
    tasks: str = typer.Option(None, help="comma-separated task names (default: all)"),
    samples: int = typer.Option(None, help="samples per task x length"),
    seed: int = typer.Option(0, help="suite seed: same seed, same samples"),
):
    """Synthetic long-context suite through vLLM; paired comparison of checkpoints against the first."""
    from pipeline.evaluate import EvalConfig, evaluate

    named = {}
    for item in filter(None, (m.strip() for m in models.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RetmaskError(f"--models item {item!r} is not name=model (e.g. base=smollm2-135m-instruct)")
        named[name] = path
    kwargs = {"models": named, "seed": seed}
    if lengths:
        kwargs["lengths"] = _ints(lengths)
    if tasks:
        kwargs["tasks"] = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if samples:
        kwargs["samples_per_cell"] = samples
    evaluate(EvalConfig(**kwargs), out)
    print(f"wrote {out}/results.json, results.md and plots")


@cli.command()
def demo(
    out: str = typer.Option("runs/demo", help="output directory (rerun to resume)"),
    control: bool = typer.Option(False, "--control", help="also train and evaluate on random-head pairs (~8 more minutes)"),
    prompts: int = typer.Option(None, help="chat prompts for preference pairs (default 80)"),
):
    """The whole RetMask loop on the embedded model; writes OUT/REPORT.md."""
    from jobs.demo import DemoConfig, run_demo

    config = DemoConfig(out=out, train_control=control)
    if prompts:
        config.num_prompts = prompts
    print(f"report: {run_demo(config)}")


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
    """``write(tmp)`` then rename over ``target``: a failed write never leaves a half file under its name."""
    import os
    from pathlib import Path

    target = Path(target)
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")  # the suffix tells matplotlib the format
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    except OSError as err:
        raise RetmaskError(f"cannot write {target} ({err.strerror or err}); choose another --out") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself could not be made: nothing to clean up
            pass


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
    result = compare_many(loaded, _ints(k))
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


cli.add_typer(heads_app, name="heads")


def app() -> None:
    """Console entry point under the run contract (``retrieval_heads.errors``): exit 0 / 1 user error /
    2 usage / 130 Ctrl-C / 143 SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Standalone mode: typer prints usage errors and exits 2, turns Ctrl-C into exit 130 and honours
    # typer.Exit codes; RetmaskError passes through to run_cli, which prints it as one line.
    run_cli(lambda: cli(standalone_mode=True))


if __name__ == "__main__":
    app()
