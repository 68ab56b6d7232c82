"""RESULTS.md of ``retmask study``: the pre-registered outcomes (docs/STUDY.md) from the stages' outputs.

The primary outcome is the paired difference RetMask − control; the eval ran with the base model as its
baseline, so every paired comparison is recomputed here from the per-sample scores in results.json, with
the pre-registered bootstrap (``StudyConfig.bootstrap`` replicates, seed 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jobs.report import verdict

BOOTSTRAP_SEED = 0


def paired(results: dict, order: list[str], replicates: int) -> dict:
    """``summarize`` of the eval's per-sample scores with ``order[0]`` as the baseline."""
    from pipeline.evaluation.statistics import summarize

    samples = results["samples"]
    scores = np.array([[s["outputs"][name]["score"] for s in samples] for name in order])
    cells = list(dict.fromkeys((s["task"], s["length"]) for s in samples))
    where = {c: i for i, c in enumerate(cells)}
    groups = np.array([where[(s["task"], s["length"])] for s in samples])
    return summarize(scores, order, cells, groups, replicates, BOOTSTRAP_SEED)


def _pts(stat: dict, signed: bool = True) -> str:
    lo, hi = (100 * x for x in stat["ci"])
    mean = 100 * stat["mean"]
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]" if signed else f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"


def outcome(diff: dict) -> str:
    """The pre-registered verdict word for a paired difference."""
    low, high = diff["overall"]["ci"]
    return "positive" if low > 0 else "negative" if high < 0 else "null"


def _primary(results: dict, replicates: int) -> tuple[list[str], str]:
    vs_control = paired(results, ["control", "retmask", "base"], replicates)["paired"]["retmask"]
    word = outcome(vs_control)
    lo, hi = (100 * x for x in vs_control["overall"]["ci"])
    sentence = (f"Primary outcome ({word}): DPO on retrieval-masked pairs minus DPO on random-head-masked pairs, "
                f"{100 * vs_control['overall']['mean']:+.1f} points on the suite's overall score, 95% interval "
                f"[{lo:+.1f}, {hi:+.1f}] (half-width {(hi - lo) / 2:.1f}; share of samples whose score changed "
                f"{vs_control['share_changed']:.2f}).")
    return ["## Primary outcome", "", sentence, "", verdict(vs_control, "RetMask"), ""], word


def _secondary(results: dict, replicates: int) -> list[str]:
    by_base = paired(results, ["base", "retmask", "control"], replicates)
    vs_control = paired(results, ["control", "retmask", "base"], replicates)["paired"]["retmask"]
    lines = ["## Secondary outcomes", "", "| checkpoint | overall score (points, 95% interval) |", "|---|---|"]
    lines += [f"| {n} | {_pts(c['overall'], signed=False)} |" for n, c in by_base["checkpoints"].items()]
    lines += ["", "| paired difference | overall (points) | share changed |", "|---|---|---|"]
    for name in ("retmask", "control"):
        d = by_base["paired"][name]
        lines.append(f"| {name} − base | {_pts(d['overall'])} | {d['share_changed']:.2f} |")
    lines += ["", "Per task (descriptive; cells are not powered):", "",
              "| task | RetMask − control | RetMask − base | control − base |", "|---|---|---|---|"]
    for task in vs_control["tasks"]:
        diffs = [vs_control["tasks"][task], *(by_base["paired"][arm]["tasks"][task] for arm in ("retmask", "control"))]
        lines.append(f"| {task} | " + " | ".join(_pts(d) for d in diffs) + " |")
    ppl = results.get("perplexity") or {}
    if all(ppl.get(n) for n in ("base", "retmask", "control")):
        lines += ["", "Chat perplexity guard (assistant turns of the built-in held-out chat; flagged above +10%):", ""]
        for name in ("retmask", "control"):
            ratio = ppl[name]["perplexity"] / ppl["base"]["perplexity"]
            flag = " **flagged**" if ratio > 1.10 else ""
            lines.append(f"- {name}: {ppl[name]['perplexity']:.2f} vs base {ppl['base']['perplexity']:.2f} "
                         f"({ratio - 1:+.1%}){flag}")
    return lines + [""]


def _calibration(out: Path) -> list[str]:
    cal = json.loads((out / "calibration" / "cells.json").read_text())
    lines = ["## Calibration (base model, calibration seed)", "",
             f"Rule branch applied: {cal['rule']}; {len(cal['cells'])} cells selected: {', '.join(cal['cells'])}.", "",
             "| cell | base score (points) | selected |", "|---|---|---|"]
    lines += [f"| {c} | {s:.1f} | {'yes' if c in cal['cells'] else ''} |"
              for c, s in cal["calibration_scores"].items()]
    return lines + [""]


def _training(out: Path) -> list[str]:
    lines = ["## Pairs and training", "", "| arm | rows | pairs kept | removed by filter | steps | held-out reward "
             "accuracy, start -> end |", "|---|---|---|---|---|---|"]
    for arm in ("retmask", "control"):
        stats = json.loads((out / f"train_{arm}" / "data_stats.json").read_text())
        metrics = json.loads((out / f"train_{arm}" / "metrics.json").read_text())
        rows = stats.get("rows", 0)
        removed = ", ".join(f"{k} {v} ({v / rows:.0%})" for k, v in stats["removed"].items() if rows) or "-"
        start, end = metrics.get("eval_start") or {}, metrics.get("eval_end") or {}
        acc = " -> ".join(f"{e['rewards/accuracies']:.2f}" if "rewards/accuracies" in e else "-" for e in (start, end))
        lines.append(f"| {arm} | {rows} | {stats['pairs']} | {removed} | {metrics['global_step']} | {acc} |")
    return lines + [""]


def _heads(out: Path) -> list[str]:
    text = (out / "heads" / "shift.txt").read_text().rstrip()
    return ["## Retrieval heads before and after DPO", "", "```", text, "```", "",
            f"Plot: `{out / 'heads' / 'shift.png'}` (base, each trained model, and each difference).", ""]


PLOTS = {"eval/overall.png": "overall score per checkpoint, with intervals",
         "eval/scores_by_length.png": "score per task and length, per checkpoint",
         "train_retmask/curves.png": "DPO curves, RetMask arm",
         "train_control/curves.png": "DPO curves, control arm",
         "heads/shift.png": "retrieval scores of base and each trained model, and each difference"}


def _plots(out: Path) -> list[str]:
    """The plots the stages wrote, by path (a missing one is named as missing, never silently left out)."""
    lines = ["## Plots", ""]
    for name, what in PLOTS.items():
        path = out / name
        lines.append(f"- `{path}`: {what}" + ("" if path.exists() else " (**missing**)"))
    return lines + [""]


def _settings(cfg, out: Path) -> list[str]:
    """Where the run's settings are, and every one that differs from the pre-registered (dataclass) default."""
    import dataclasses

    import yaml

    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    (out / "study_config.yaml").write_text(yaml.safe_dump(
        {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, sort_keys=False))
    registered = type(cfg)()
    changed = [f"`{k}` {getattr(registered, k)!r} -> {v!r}" for k, v in values.items()
               if k != "out" and v != getattr(registered, k)]
    lines = [f"Pre-registration: docs/STUDY.md. Model: `{cfg.model}`. Settings of this run: "
             f"`{out / 'study_config.yaml'}`; command: `retmask study --config FILE` with them (rerun to resume). "
             f"Outputs of every stage: `{out}/`.", ""]
    if changed:
        lines += ["**Not the pre-registered settings** (a pilot, another scale, or a deviation to report): "
                  + "; ".join(changed) + ".", ""]
    return lines


def write_results(cfg, out: Path, timings: dict) -> Path:
    """RESULTS.md under ``out`` (copy it to docs/RESULTS.md for the record); returns its path."""
    results = json.loads((out / "eval" / "results.json").read_text())
    primary, word = _primary(results, cfg.bootstrap)
    lines = ["# RetMask vs control: results", "", *_settings(cfg, out),
             f"**Result ({word}).**", "", *primary, *_secondary(results, cfg.bootstrap), *_calibration(out),
             *_training(out), *_heads(out), *_plots(out),
             "## Stage timings", "", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {name} | {t['seconds']:.0f} |" for name, t in timings.items()]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path
