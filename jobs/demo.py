"""``retmask demo``: the RetMask loop on the embedded model, each stage through its public entry point.

Stages whose outputs are complete (a ``.done`` marker written after success) are skipped on rerun.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from retrieval_heads.models import EMBEDDED_ALIAS


@dataclass
class DemoConfig:
    model: str = EMBEDDED_ALIAS
    out: str = "runs/demo"
    detect_lengths: tuple[int, ...] = (500, 1000, 2000, 3000)
    detect_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    detect_needles: int = 2
    ablate_k: int = 5
    ablate_seeds: tuple[int, ...] = (0, 1, 2)
    ablate_lengths: tuple[int, ...] = (2000,)
    num_prompts: int = 200
    train_control: bool = True  # also train on random-head pairs, the paper's control
    eval_lengths: tuple[int, ...] = (1000, 2000)
    eval_samples: int = 4  # per task x length; the report states the resulting interval widths


def _stage_fetch(cfg: DemoConfig, out: Path) -> None:
    from retrieval_heads.models import resolve_model

    (out / "model.txt").write_text(resolve_model(cfg.model) + "\n")


def _stage_detect(cfg: DemoConfig, out: Path) -> None:
    from retrieval_heads.detect import DetectConfig, detect

    detect(DetectConfig(model=cfg.model, lengths=cfg.detect_lengths, depths=cfg.detect_depths, num_needles=cfg.detect_needles), out / "detect")


def _stage_ablate(cfg: DemoConfig, out: Path) -> None:
    from retrieval_heads.ablation import AblationConfig, run_ablation

    run_ablation(AblationConfig(model=cfg.model, scores=str(out / "detect" / "head_scores.json"), k=cfg.ablate_k,
                                seeds=cfg.ablate_seeds, lengths=cfg.ablate_lengths), out / "ablate")


def _stage_generate(cfg: DemoConfig, out: Path) -> None:
    from importlib import resources

    from pipeline.generate import GenerateConfig, generate

    config = GenerateConfig.from_yaml(str(resources.files("jobs") / "configs" / "demo.yaml"), model=cfg.model,
                                      scores=str(out / "detect" / "head_scores.json"), out=str(out / "generate"),
                                      max_prompts=cfg.num_prompts)
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
    train(TrainConfig.from_preset("demo", model=cfg.model, pairs=str(out / "generate"), rejected=rejected,
                                  output_dir=str(out / name), drop_truncated=False))


def _stage_train(cfg: DemoConfig, out: Path) -> None:
    _train(cfg, out, "retrieval_masked", "train_retrieval")


def _stage_train_control(cfg: DemoConfig, out: Path) -> None:
    if cfg.train_control:
        _train(cfg, out, "random_masked", "train_control")


def _stage_eval(cfg: DemoConfig, out: Path) -> None:
    from pipeline.evaluate import EvalConfig, evaluate

    models = {"base": cfg.model, "retmask": str(out / "train_retrieval" / "final")}
    if (out / "train_control" / "final").exists():
        models["control"] = str(out / "train_control" / "final")
    evaluate(EvalConfig.demo(models, lengths=cfg.eval_lengths, samples_per_cell=cfg.eval_samples), out / "eval")


STAGES: list[tuple[str, Callable[[DemoConfig, Path], None]]] = [
    ("fetch-model", _stage_fetch),
    ("detect", _stage_detect),
    ("ablate", _stage_ablate),
    ("generate", _stage_generate),
    ("inspect", _stage_inspect),
    ("train", _stage_train),
    ("train-control", _stage_train_control),
    ("eval", _stage_eval),
]


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or resume) every stage, then write REPORT.md; returns the report path."""
    import psutil

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    start = time.perf_counter()
    for i, (name, stage) in enumerate(STAGES, 1):
        marker = out / f".{name}.done"
        if marker.exists():
            print(f"[{i}/{len(STAGES)}] {name}: complete, skipped", file=sys.stderr)
            continue
        print(f"[{i}/{len(STAGES)}] {name} ...", file=sys.stderr)
        t0 = time.perf_counter()
        stage(cfg, out)
        timings[name] = round(time.perf_counter() - t0, 1)
        (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        marker.touch()
        print(f"[{i}/{len(STAGES)}] {name}: done in {timings[name]:.0f} s (total {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    from jobs.report import write_report

    rss_gb = psutil.Process().memory_info().rss / 2**30
    return write_report(cfg, out, timings, rss_gb)
