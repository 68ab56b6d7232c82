"""What an evaluation writes in its output directory, all from the results dict of ``run.evaluate``.

``results.json`` (config, scores, intervals, paired differences, perplexity, per-sample outputs),
``results.md``, ``samples.jsonl`` (the prompts), ``scores_by_length.png`` and ``overall.png``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.evaluation.fitting import EvalSample

OUTPUTS = ("results.json", "results.md", "samples.jsonl", "scores_by_length.png", "overall.png")


def write_results(results: dict, samples: list[EvalSample], out: Path) -> Path:
    """Write every output under ``out``; returns the path of ``results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(dataclasses.asdict(s)) + "\n")
    plot_scores_by_length(results, out / "scores_by_length.png")
    plot_overall(results, out / "overall.png")
    (out / "results.md").write_text(markdown(results))
    return out / "results.json"


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(stat: dict, signed: bool = False) -> str:
    lo, hi = stat["ci"]
    mean = f"{100 * stat['mean']:+.1f}" if signed else _pts(stat["mean"])
    return f"{mean} [{100 * lo:.1f}, {100 * hi:.1f}]"


def summary(results: dict) -> list[str]:
    """One line per checkpoint: overall score with its interval, and the paired difference to the baseline."""
    lines = []
    for name, ckpt in results["checkpoints"].items():
        line = f"{name}: overall {_ci(ckpt['overall'])}"
        if name in results["paired"]:
            paired = results["paired"][name]
            lo, hi = paired["overall"]["ci"]
            line += f"; vs {paired['vs']}: {100 * paired['overall']['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        lines.append(line)
    return lines


def markdown(results: dict) -> str:
    """Task x length table per checkpoint, overall with 95% CI, paired differences, perplexity."""
    names = list(results["checkpoints"])
    suite = results["suite"]
    shape = f"{len(suite['tasks'])} tasks x {len(suite['lengths'])} lengths"
    cells = suite.get("cells")  # absent from results written before explicit cells existed
    if cells and len(cells) != len(suite["tasks"]) * len(suite["lengths"]):
        shape = f"{len(cells)} cells ({', '.join(cells)})"
    lines = [
        "# Long-context evaluation",
        "",
        f"{suite['num_samples']} samples per checkpoint: {shape} x {suite['samples_per_cell']} "
        f"(seed {suite['seed']}), greedy decoding. Scores in points (0-100, "
        "string-match recall); brackets: 95% bootstrap intervals. Baseline: " + names[0]
        + f". Every checkpoint runs in {results.get('dtype', 'its own dtype')}.",
        "",
        "| model | path |",
        "|---|---|",
        *[f"| {n} | `{results['models'][n]['path']}` |" for n in names],
        "",
        "## Scores by task and length",
        "",
        "| task | length | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    first = results["checkpoints"][names[0]]["tasks"]
    for task, info in first.items():
        for length in info["by_length"]:
            row = [_pts(results["checkpoints"][n]["tasks"][task]["by_length"][length]["mean"]) for n in names]
            lines.append(f"| {task} | {length} | " + " | ".join(row) + " |")
        totals = [f"**{_pts(results['checkpoints'][n]['tasks'][task]['mean'])}**" for n in names]
        lines.append(f"| **{task}** | all | " + " | ".join(totals) + " |")
    lines += ["", "## Overall", "", "| model | overall | chat perplexity |", "|---|---|---|"]
    for n in names:
        ppl = results["perplexity"].get(n)
        lines.append(f"| {n} | {_ci(results['checkpoints'][n]['overall'])} | "
                     + (f"{ppl['perplexity']:.3f} |" if ppl else "- |"))
    if results["paired"]:
        lines += ["", f"## Paired differences vs {names[0]} (same samples)", "",
                  "| model | overall | share of samples changed | " + " | ".join(first) + " |",
                  "|---|---|---|" + "---|" * len(first)]
        for n, p in results["paired"].items():
            lines.append(f"| {n} | {_ci(p['overall'], True)} | {100 * p['share_changed']:.0f}% | "
                         + " | ".join(_ci(p["tasks"][t], True) for t in first) + " |")
    ppl = next((p for p in results["perplexity"].values() if p), None)
    if ppl:
        lines += ["", f"Chat perplexity: {ppl['scored']} of {ppl['dialogues']} held-out dialogues "
                  f"({ppl['tokens']} tokens); a rise means the fine-tune hurt general chat quality."]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores_by_length(results: dict, path: Path) -> Path:
    """One panel per task: score vs length, one line (with 95% band) per checkpoint."""
    plt = _pyplot()
    names = list(results["checkpoints"])
    tasks = list(results["checkpoints"][names[0]]["tasks"])
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for n in names:
            by_length = results["checkpoints"][n]["tasks"][task]["by_length"]
            xs = [int(x) for x in by_length]
            ax.plot(xs, [100 * v["mean"] for v in by_length.values()], marker="o", label=n)
            ax.fill_between(xs, [100 * v["ci"][0] for v in by_length.values()],
                            [100 * v["ci"][1] for v in by_length.values()], alpha=0.15)
        ax.set_title(task, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x // 1000}K" if x % 1000 == 0 else str(x) for x in xs], fontsize=7)
        ax.set_ylim(-5, 105)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("prompt length (tokens)", fontsize=9)
    fig.supylabel("score (points)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_overall(results: dict, path: Path) -> Path:
    """Overall score per checkpoint with its 95% interval."""
    plt = _pyplot()
    names = list(results["checkpoints"])
    stats = [results["checkpoints"][n]["overall"] for n in names]
    means = [100 * s["mean"] for s in stats]
    err = [[m - 100 * s["ci"][0] for m, s in zip(means, stats)], [100 * s["ci"][1] - m for m, s in zip(means, stats)]]
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(names), 3.2))
    ax.bar(names, means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    for i, (n, m, s) in enumerate(zip(names, means, stats)):
        label = f"{m:.1f}"
        if n in results["paired"]:
            label += f" ({100 * results['paired'][n]['overall']['mean']:+.1f})"
        ax.text(i, 100 * s["ci"][1] + 2, label, ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("overall score (points)")
    ax.set_ylim(0, 115)
    ax.set_title("Long-context suite, 95% bootstrap CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
