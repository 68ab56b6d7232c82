"""Pre-flight report on a head-score file: is it sparse enough, and measured on enough trials, to mask by?

RetMask's gains track how concentrated the retrieval scores are, and a score is a mean over counted NIAH
trials, so two questions come before generating pairs from a file: how sparse it is against the paper's models,
and whether its means are stable. The references below are the three score files the RetMask authors publish
(``YoumiMa/RetMask``, ``1_Retrieval_Head_Deactivation/head_score/``), measured with ``HeadScores.sparsity``.
"""

from __future__ import annotations

import numpy as np

from retrieval_heads.scores import HeadScores

# Published files, measured with HeadScores.sparsity(threshold=0.1) (every head holds the same number of trials).
PUBLISHED = {
    "Llama-3.1-8B-Instruct": dict(counted_trials=342, gini=0.935, top5pct_mass=0.777, share_above_threshold=0.032),
    "Qwen3-8B": dict(counted_trials=600, gini=0.902, top5pct_mass=0.710, share_above_threshold=0.050),
    "Olmo-3-7B-Think": dict(counted_trials=30, gini=0.850, top5pct_mass=0.528, share_above_threshold=0.045),
}
# The paper: concentrated retrieval heads respond strongly, distributed ones show limited gains. The least
# concentrated published file is the weakest responder's: scores spread wider than it are a reason for doubt.
WEAKEST_RESPONDER = min(PUBLISHED, key=lambda m: PUBLISHED[m]["gini"])
# 50 sits between the thin published file (Olmo-3-7B-Think: 30 counted of 600 run, 5%) and the other two (342,
# 600). On those files, thresholding at 0.1 leaves 32 heads within 1.96 standard errors of the threshold for
# Olmo-3-7B-Think against 5 and 4 for the others: at 30 trials the selected set is partly noise.
MIN_COUNTED_TRIALS = 50
# Heads within 1.96 SE of the threshold, as a share of the heads it selects: 0.70 (Olmo-3-7B-Think), 0.15
# (Llama-3.1-8B-Instruct), 0.07 (Qwen3-8B) on the published files.
MAX_UNCERTAIN_SHARE = 0.25


def preflight(scores: HeadScores, threshold: float = 0.1, per_trial: bool = True) -> dict:
    """Sparsity, trial counts and warnings for ``scores``; ``per_trial`` False for one-value-per-head formats."""
    sparsity = scores.sparsity(threshold)
    means = scores.mean()
    selected = sum(1 for s in means.values() if s >= threshold)  # what `threshold` selection masks
    report: dict = {
        "source": scores.source,
        "num_heads": sparsity["num_heads"],
        "threshold": threshold,
        "heads_selected": selected,
        "share_above_threshold": sparsity["share_above_threshold"],
        "gini": sparsity["gini"],
        "top5pct_mass": sparsity["top5pct_mass"],
        "counted_trials": None,
        "heads_near_threshold": None,
        "reference": {"weakest_responder": WEAKEST_RESPONDER, **PUBLISHED[WEAKEST_RESPONDER]},
        "warnings": [],
        "notes": [],
    }
    warnings, notes = report["warnings"], report["notes"]
    if selected == 0:
        warnings.append(f"no head scores {threshold} or more: threshold selection would mask nothing")
    if not per_trial:
        notes.append(
            "one value per head, not Wu retrieval scores: no trial counts, and sparsity is not comparable with the "
            "paper's models; rank-based selection (top_k) and `retmask heads compare` are what these values support"
        )
        return report
    counts = [len(v) for v in scores.trials.values()]
    report["counted_trials"] = {"min": min(counts), "median": float(np.median(counts)), "max": max(counts)}
    if min(counts) < MIN_COUNTED_TRIALS:
        thin = PUBLISHED["Olmo-3-7B-Think"]["counted_trials"]
        warnings.append(
            f"scores rest on as few as {min(counts)} counted trials (< {MIN_COUNTED_TRIALS}; the published "
            f"Olmo-3-7B-Think file rests on {thin}, Llama-3.1-8B-Instruct on 342, Qwen3-8B on 600): means are "
            "unstable: detect with more lengths, depths or needles"
        )
    near = _near_threshold(scores, threshold)
    report["heads_near_threshold"] = near
    if near is not None and selected and near / selected > MAX_UNCERTAIN_SHARE:
        warnings.append(
            f"{near} heads lie within 1.96 standard errors of the threshold {threshold} ({selected} selected): "
            "more trials would change which heads are masked"
        )
    reference = PUBLISHED[WEAKEST_RESPONDER]["gini"]
    if sparsity["gini"] < reference:
        warnings.append(
            f"scores are less sparse (Gini {sparsity['gini']:.3f}) than the paper's weakest responder "
            f"({WEAKEST_RESPONDER}, Gini {reference:.3f}): RetMask's gains track sparsity, expect little gain"
        )
    return report


def _near_threshold(scores: HeadScores, threshold: float) -> int | None:
    """Heads whose mean is within 1.96 standard errors of ``threshold`` (None with fewer than 2 trials)."""
    near = 0
    for values in scores.trials.values():
        if len(values) < 2:
            return None
        v = np.asarray(values, dtype=np.float64)
        if abs(v.mean() - threshold) < 1.96 * v.std(ddof=1) / np.sqrt(len(v)):
            near += 1
    return near


def format_preflight(report: dict) -> str:
    """The report as the CLI prints it: one summary line, then one line per warning or note."""
    source = "" if report["source"] == "<memory>" else f" {report['source']}"  # fresh `detect` scores have no file yet
    line = (
        f"pre-flight{source}: {report['heads_selected']} of {report['num_heads']} heads score >= "
        f"{report['threshold']} ({report['share_above_threshold']:.1%} above), Gini {report['gini']:.3f}, "
        f"top-5% mass {report['top5pct_mass']:.1%}"
    )
    trials = report["counted_trials"]
    if trials:
        line += f", counted trials per head {trials['min']} (min) / {trials['median']:g} (median)"
    lines = [line]
    lines += [f"  warning: {w}" for w in report["warnings"]]
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)
