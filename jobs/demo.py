"""``retmask demo``: the RetMask loop on the embedded model, each stage through its public entry point.

The stages are resumable (``jobs.stages``): a rerun skips finished stages and restarts the ones whose
settings changed, and everything after them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.stages import Stage, run_stages
from retrieval_heads.config import opt
from retrieval_heads.models import EMBEDDED_ALIAS


@dataclass
class DemoConfig:
    """Sizes of every stage, chosen to fit ~20 minutes on 2 CPU cores (docs/BENCHMARKS.md, "Demo").

    ``jobs/configs/demo_run.yaml`` maps 1:1; the generation stage reads ``jobs/configs/demo.yaml``.
    """

    model: str = opt(EMBEDDED_ALIAS, "alias, local checkpoint or hub id of the model the loop runs on")
    out: str = opt("runs/demo", "output directory (rerun to resume)")
    detect_lengths: tuple[int, ...] = opt((1000, 2000), "detection context lengths in tokens")
    detect_depths: tuple[float, ...] = opt((0.0, 0.25, 0.5, 0.75, 1.0), "detection needle depths")
    detect_needles: int = opt(2, "built-in needles per detection length x depth")
    ablate_k: int = opt(5, "heads masked per ablation condition")
    ablate_seeds: tuple[int, ...] = opt((0, 1), "seeds of the random-head ablation controls")
    ablate_lengths: tuple[int, ...] = opt((1000,), "ablation context lengths in tokens")
    ablate_dtype: str = opt("bfloat16", "ablation dtype: the checkpoint's, 2x faster prefill than float32 here")
    num_prompts: int = opt(
        80, "chat prompts for preference pairs: ~72 training pairs after the held-out split, 9 DPO steps of 8 pairs"
    )
    train_control: bool = opt(False, "also train (and evaluate) on random-head pairs: ~8 more minutes")
    eval_lengths: tuple[int, ...] = opt((1000, 2000), "evaluation context lengths in tokens")
    eval_samples: int = opt(4, "evaluation samples per task x length; the report states the interval widths")


def _stage_fetch(cfg: DemoConfig, out: Path) -> None:
    from retrieval_heads.models import resolve_model

    (out / "model.txt").write_text(resolve_model(cfg.model) + "\n")


def _stage_detect(cfg: DemoConfig, out: Path) -> None:
    from retrieval_heads.detect import DetectConfig, detect

    detect(
        DetectConfig(
            model=cfg.model, lengths=cfg.detect_lengths, depths=cfg.detect_depths, num_needles=cfg.detect_needles
        ),
        out / "detect",
    )


def _stage_ablate(cfg: DemoConfig, out: Path) -> None:
    from retrieval_heads.ablation import AblationConfig, run_ablation

    run_ablation(
        AblationConfig(
            model=cfg.model,
            scores=str(out / "detect" / "head_scores.json"),
            k=cfg.ablate_k,
            seeds=cfg.ablate_seeds,
            lengths=cfg.ablate_lengths,
            dtype=cfg.ablate_dtype,
        ),
        out / "ablate",
    )


def _stage_generate(cfg: DemoConfig, out: Path) -> None:
    from importlib import resources

    from pipeline.generate import GenerateConfig, generate
    from retrieval_heads.config import load_config

    config = load_config(
        GenerateConfig,
        resources.files("jobs") / "configs" / "demo.yaml",
        model=cfg.model,
        scores=str(out / "detect" / "head_scores.json"),
        out=str(out / "generate"),
        max_prompts=cfg.num_prompts,
    )
    generate(config)


def _stage_inspect(cfg: DemoConfig, out: Path) -> None:
    from pipeline.inspect import format_report, inspect_run

    (out / "inspect").mkdir(exist_ok=True)
    report = inspect_run(str(out / "generate"), plots_dir=str(out / "inspect"))
    (out / "inspect" / "report.txt").write_text(format_report(report) + "\n")
    (out / "inspect" / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def _train(cfg: DemoConfig, out: Path, rejected: str, name: str) -> None:
    from trainer.config import TrainConfig
    from trainer.dpo import train

    # The demo's 128-token budget truncates most responses; dropping truncated pairs (a reader filter the
    # paper does not apply) would leave too few pairs to train on.
    train(
        TrainConfig.from_preset(
            "demo",
            model=cfg.model,
            pairs=str(out / "generate"),
            rejected=rejected,
            output_dir=str(out / name),
            drop_truncated=False,
        )
    )


def _stage_train(cfg: DemoConfig, out: Path) -> None:
    _train(cfg, out, "retrieval_masked", "train_retrieval")


def _stage_train_control(cfg: DemoConfig, out: Path) -> None:
    if cfg.train_control:
        _train(cfg, out, "random_masked", "train_control")
    else:
        print("    skipped: control training is off (retmask demo --control turns it on)", file=sys.stderr)


def _stage_eval(cfg: DemoConfig, out: Path) -> None:
    from jobs.eval import run as run_eval
    from pipeline.evaluation.config import EvalConfig

    models = {"base": cfg.model, "retmask": str(out / "train_retrieval" / "final")}
    if cfg.train_control:
        models["control"] = str(out / "train_control" / "final")
    config = EvalConfig.demo(models, lengths=cfg.eval_lengths, samples_per_cell=cfg.eval_samples)
    config.engine.kv_cache_memory_bytes = 512 << 20  # ~11k float32 tokens: prefill-bound on CPU, more buys nothing
    run_eval(config, out / "eval")


STAGES: list[Stage] = [
    Stage("fetch-model", _stage_fetch, None, ("model",)),
    Stage("detect", _stage_detect, "detect", ("detect_lengths", "detect_depths", "detect_needles")),
    Stage("ablate", _stage_ablate, "ablate", ("ablate_k", "ablate_seeds", "ablate_lengths", "ablate_dtype")),
    Stage("generate", _stage_generate, "generate", ("num_prompts",)),
    Stage("inspect", _stage_inspect, "inspect", ()),
    Stage("train", _stage_train, "train_retrieval", ()),
    Stage("train-control", _stage_train_control, "train_control", ("train_control",)),
    Stage("eval", _stage_eval, "eval", ("train_control", "eval_lengths", "eval_samples")),
]


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or resume) every stage (``jobs.stages.run_stages``), then write REPORT.md; returns its path."""
    from jobs.report import write_report

    out = Path(cfg.out)
    return write_report(cfg, out, run_stages(STAGES, cfg, out))
