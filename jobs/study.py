"""``retmask study``: the pre-registered RetMask vs control study (docs/STUDY.md), as a resumable job.

Every stage goes through a stage's public entry point (detection, eval, generation, training) and leaves its
outputs under ``out`` for inspection; ``jobs/study_report.py`` turns them into RESULTS.md. A rerun skips
finished stages (``jobs.stages``), so the study can be split across sessions, and rerun at another scale
(a bigger model on a GPU cluster) by changing the YAML alone.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.stages import Stage, run_stages
from retrieval_heads.config import opt
from retrieval_heads.models import EMBEDDED_ALIAS


@dataclass
class StudyConfig:
    """Every setting of the study; ``jobs/configs/study.yaml`` is the pre-registered one (docs/STUDY.md)."""

    model: str = opt(EMBEDDED_ALIAS, "alias, local checkpoint or hub id of the base model")
    out: str = opt("runs/study", "output directory of every stage (rerun to resume)")
    # detection (base, then both trained models on the same grid)
    detect_lengths: tuple[int, ...] = opt((1000, 2000, 4000), "detection context lengths in tokens")
    detect_depths: tuple[float, ...] = opt((0.0, 0.25, 0.5, 0.75, 1.0), "detection needle depths")
    detect_needles: int = opt(2, "built-in needles per detection length x depth")
    threshold: float = opt(0.1, "retrieval heads: mean score >= this; the control masks as many random others")
    # generation
    prompts_source: str = opt("builtin", "prompt source of the pairs (GenerateConfig.prompts_source)")
    prompts: str | None = opt(None, "prompt file or directory (sources other than builtin)")
    repeats: int = opt(2, "each prompt is used this many times under distinct ids (independent samples)")
    max_prompts: int | None = opt(None, "use the first N prompt instances (None: all)")
    max_tokens: int = opt(512, "response budget per variant")
    temperature: float = opt(0.6, "sampling temperature (RetMask's)")
    max_model_len: int = opt(1024, "prompt + response tokens of the generation engine")
    generate_seed: int = opt(0, "engine seed, per-prompt seeds and the random-head draw")
    kv_cache_memory_bytes: int = opt(1 << 30, "generation engine KV cache (CPU)")
    # DPO, both arms
    train_preset: str = opt("demo", "TrainConfig preset both arms start from")
    max_steps: int = opt(60, "optimizer steps of each arm (the same for both)")
    max_length: int = opt(1024, "DPO prompt + response tokens per sequence")
    drop_truncated: bool = opt(True, "drop pairs where either side hit the response budget")
    train_eval_fraction: float = opt(0.05, "share of prompts held out for the DPO eval loss")
    train_seed: int = opt(42, "DPO seed of both arms")
    # evaluation
    calibration_seed: int = opt(101, "suite seed of the calibration run (never used for study samples)")
    calibration_lengths: tuple[int, ...] = opt((1000, 2000, 4000), "lengths the calibration run covers")
    calibration_samples: int = opt(6, "calibration samples per task x length")
    cell_low: float = opt(10.0, "keep cells whose calibration score (points) is at least this ...")
    cell_high: float = opt(90.0, "... and at most this")
    min_cells: int = opt(3, "fewer qualifying cells widen the rule to (0, 100), then to all cells")
    study_seed: int = opt(7, "suite seed of the study's samples")
    study_samples: int = opt(480, "samples per checkpoint, split evenly across the selected cells")
    bootstrap: int = opt(2000, "bootstrap replicates of every interval (seed 0)")
    eval_kv_cache_memory_bytes: int = opt(512 << 20, "evaluation engine KV cache (CPU)")
    shift_min_change: float = opt(0.05, "a head gained or lost when its mean score moved at least this")


ARMS = {"retmask": "retrieval_masked", "control": "random_masked"}


def _detect(cfg: StudyConfig, model: str, out: Path) -> None:
    from jobs.detect import run
    from retrieval_heads.detect import DetectConfig

    run(DetectConfig(model=model, lengths=cfg.detect_lengths, depths=cfg.detect_depths,
                     num_needles=cfg.detect_needles), out)


def _stage_detect_base(cfg: StudyConfig, out: Path) -> None:
    _detect(cfg, cfg.model, out / "detect_base")


def _eval_config(cfg: StudyConfig, models: dict[str, str], **fields):
    from pipeline.evaluation.config import EvalConfig
    from retrieval_heads.config import load_config

    return load_config(EvalConfig, None, models=models, bootstrap=cfg.bootstrap,
                       engine={"kv_cache_memory_bytes": cfg.eval_kv_cache_memory_bytes}, **fields)


def _stage_calibrate(cfg: StudyConfig, out: Path) -> None:
    from jobs.eval import run
    from pipeline.evaluation.calibration import read_cell_scores, select_cells

    config = _eval_config(cfg, {"base": cfg.model}, lengths=cfg.calibration_lengths,
                          samples_per_cell=cfg.calibration_samples, seed=cfg.calibration_seed, perplexity=False)
    scores = read_cell_scores(run(config, out / "calibration"))  # points, the baseline's
    cells, rule = select_cells(scores, cfg.cell_low, cfg.cell_high, cfg.min_cells)
    (out / "calibration" / "cells.json").write_text(json.dumps({
        "rule": rule, "cells": [f"{t}@{n}" for t, n in cells],
        "calibration_scores": {f"{t}@{n}": s for (t, n), s in scores.items()}}, indent=2) + "\n")


def _stage_generate(cfg: StudyConfig, out: Path) -> None:
    from jobs.generate import run
    from pipeline.generate import GenerateConfig
    from retrieval_heads.config import load_config

    run(load_config(
        GenerateConfig, None, model=cfg.model, prompts_source=cfg.prompts_source, prompts=cfg.prompts,
        prompt_options={"repeats": cfg.repeats}, max_prompts=cfg.max_prompts,
        scores=str(out / "detect_base" / "head_scores.json"), selection="threshold", threshold=cfg.threshold,
        variants=["normal", *ARMS.values()], sampling={"temperature": cfg.temperature, "max_tokens": cfg.max_tokens},
        seed=cfg.generate_seed, max_model_len=cfg.max_model_len,
        engine={"kv_cache_memory_bytes": cfg.kv_cache_memory_bytes}, out=str(out / "generate"),
        # The study's first shards were generated with the engine-wide switch; every shard keeps that batching.
        batching="switched"))


def _train(cfg: StudyConfig, out: Path, arm: str) -> None:
    from jobs.train import run
    from trainer.config import TrainConfig

    run(TrainConfig.from_preset(cfg.train_preset, model=cfg.model, pairs=str(out / "generate"), rejected=ARMS[arm],
                                output_dir=str(out / f"train_{arm}"), max_steps=cfg.max_steps,
                                max_length=cfg.max_length, drop_truncated=cfg.drop_truncated,
                                eval_fraction=cfg.train_eval_fraction, seed=cfg.train_seed))


def _stage_eval(cfg: StudyConfig, out: Path) -> None:
    from jobs.eval import run

    cells = json.loads((out / "calibration" / "cells.json").read_text())["cells"]
    models = {"base": cfg.model, **{arm: str(out / f"train_{arm}" / "final") for arm in ARMS}}
    run(_eval_config(cfg, models, cells=cells, samples_per_cell=math.ceil(cfg.study_samples / len(cells)),
                     seed=cfg.study_seed), out / "eval")


def _stage_heads(cfg: StudyConfig, out: Path) -> None:
    from retrieval_heads.scores import HeadScores
    from retrieval_heads.shift import format_shift, plot_shift, score_shift

    base = HeadScores.load(out / "detect_base" / "head_scores.json")
    trained = {arm: HeadScores.load(out / f"detect_{arm}" / "head_scores.json") for arm in ARMS}
    k = sum(1 for _, s in base.ranked() if s >= cfg.threshold) or 1
    result = score_shift(base, trained, k=k, threshold=cfg.threshold, min_change=cfg.shift_min_change)
    (out / "heads").mkdir(exist_ok=True)
    (out / "heads" / "shift.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "heads" / "shift.txt").write_text(format_shift(result) + "\n")
    plot_shift(base, trained, out / "heads" / "shift.png")


STAGES: list[Stage] = [
    Stage("detect-base", _stage_detect_base, "detect_base", ("model", "detect_lengths", "detect_depths",
                                                            "detect_needles")),
    Stage("calibrate", _stage_calibrate, "calibration", ("calibration_seed", "calibration_lengths",
                                                         "calibration_samples", "cell_low", "cell_high", "min_cells")),
    Stage("generate", _stage_generate, "generate", ("threshold", "prompts_source", "prompts", "repeats", "max_prompts",
                                                    "max_tokens", "temperature", "max_model_len", "generate_seed")),
    Stage("train-retmask", lambda cfg, out: _train(cfg, out, "retmask"), "train_retmask",
          ("train_preset", "max_steps", "max_length", "drop_truncated", "train_eval_fraction", "train_seed")),
    Stage("train-control", lambda cfg, out: _train(cfg, out, "control"), "train_control", ()),
    Stage("eval", _stage_eval, "eval", ("study_seed", "study_samples", "bootstrap")),
    Stage("detect-retmask", lambda cfg, out: _detect(cfg, str(out / "train_retmask" / "final"), out / "detect_retmask"),
          "detect_retmask", ()),
    Stage("detect-control", lambda cfg, out: _detect(cfg, str(out / "train_control" / "final"), out / "detect_control"),
          "detect_control", ()),
    Stage("heads", _stage_heads, "heads", ("shift_min_change",)),
]


def run(cfg: StudyConfig) -> Path:
    """Run (or resume) every stage, then write RESULTS.md under ``out``; returns its path."""
    from jobs.study_report import write_results

    out = Path(cfg.out)
    timings = run_stages(STAGES, cfg, out)
    return write_results(cfg, out, timings)


if __name__ == "__main__":
    from jobs.cli import main

    main(["study", *sys.argv[1:]])
