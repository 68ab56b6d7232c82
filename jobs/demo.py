"""``retmask demo``: the RetMask loop on the embedded model, each stage through its public entry point.

Each stage writes a ``.<stage>.done`` marker with the settings it ran with. A rerun skips stages whose
marker matches; a stage whose settings changed starts over, and so does every stage after it. A stage
interrupted before its marker resumes where its own entry point can (generation, training).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DemoConfig, Path], None]
    output: str | None  # directory under the demo's out, cleared when the stage must start over
    fields: tuple[str, ...]  # the DemoConfig fields it depends on


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


def stage_key(cfg: DemoConfig, stage: Stage) -> str:
    """What a stage's ``.done`` marker records: the settings it ran with."""
    return json.dumps({f: getattr(cfg, f) for f in stage.fields}, sort_keys=True)


class PeakMemory:
    """Peak resident memory of this process and all its children (Ray's raylet, actors, vLLM engines).

    Sums RSS over the process tree every ``interval`` seconds, an upper bound: pages shared between
    processes (libraries, Ray's object store) count once per process.
    """

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        me, total = psutil.Process(), 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, so the
    training stage's ~3 GB would stay resident next to the evaluation's engine)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or resume) every stage, then write REPORT.md; returns the report path.

    ``timings.json`` keeps each finished stage's wall time and peak memory, so a resumed run still reports
    every stage.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "timings.json"
    timings = json.loads(record.read_text()) if record.exists() else {}
    start, upstream_changed = time.perf_counter(), False
    for i, stage in enumerate(STAGES, 1):
        marker, key = out / f".{stage.name}.done", stage_key(cfg, stage)
        done = marker.exists() and marker.read_text() == key
        if done and not upstream_changed:
            print(f"[{i}/{len(STAGES)}] {stage.name}: complete, skipped", file=sys.stderr)
            continue
        if (marker.exists() or upstream_changed) and stage.output:
            # finished before with other settings, or its inputs changed: start over (an unfinished
            # stage without a marker keeps its outputs, so generation and training resume)
            shutil.rmtree(out / stage.output, ignore_errors=True)
        marker.unlink(missing_ok=True)
        upstream_changed = True
        print(f"[{i}/{len(STAGES)}] {stage.name} ...", file=sys.stderr)
        t0 = time.perf_counter()
        with PeakMemory() as memory:
            stage.run(cfg, out)
        release_memory()  # a finished stage's freed heap goes back to the OS before the next one starts
        timings[stage.name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(memory.peak / 2**30, 2),
        }
        record.write_text(json.dumps(timings, indent=2) + "\n")
        marker.write_text(key)
        print(
            f"[{i}/{len(STAGES)}] {stage.name}: done in {timings[stage.name]['seconds']:.0f} s, peak "
            f"{timings[stage.name]['peak_rss_gb']:.1f} GiB (total {time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    from jobs.report import write_report

    return write_report(cfg, out, timings)
