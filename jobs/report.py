"""REPORT.md for a demo run: every figure and plot, and the commands that reproduce each stage."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(cfg, out: Path, timings: dict, rss_gb: float) -> Path:
    lines = [f"# RetMask demo report: {cfg.model}", ""]
    lines += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in timings.items()]
    lines += [f"| total | {sum(timings.values()):.1f} |", "", f"Driver RSS at the end: {rss_gb:.2f} GiB.", ""]
    detect = out / "detect" / "summary.json"
    if detect.exists():
        s = json.loads(detect.read_text())
        sp = s["sparsity"]
        lines += ["## Retrieval heads", "",
                  f"{s['trials_counted']} of {s['trials_run']} NIAH trials passed the ROUGE-1 filter. "
                  f"{sp['share_above_threshold']:.1%} of {sp['num_heads']} heads score > 0.1; Gini {sp['gini']:.3f}, "
                  f"top-5% mass {sp['top5pct_mass']:.2f}.", "",
                  "| head | score | counted trials |", "|---|---|---|"]
        lines += [f"| {h['head']} | {h['score']:.3f} | {h['counted_trials']} |" for h in s["top_heads"][:10]]
        lines += ["", "![head scores](detect/head_scores.png)", "",
                  f"Reproduce: `retmask detect --model {cfg.model} --out {out}/detect "
                  f"--lengths {','.join(map(str, cfg.detect_lengths))} --needles {cfg.detect_needles}`", ""]
    ablate = out / "ablate" / "ablation.md"
    if ablate.exists():
        lines += ["## Causality: masking retrieval heads vs random heads", "", ablate.read_text(),
                  "![ablation](ablate/ablation.png)", "",
                  f"Reproduce: `retmask ablate --scores {out}/detect/head_scores.json --out {out}/ablate --k {cfg.ablate_k}`", ""]
    inspect = out / "inspect" / "report.txt"
    if inspect.exists():
        lines += ["## Preference pairs", "", "```", inspect.read_text().rstrip(), "```", "",
                  "Reproduce at full scale: `ray job submit --working-dir . -- python -m jobs.generate "
                  "--config jobs/configs/generate_llama31_8b.yaml`", ""]
    for name, title in (("train_retrieval", "DPO on retrieval-masked pairs"), ("train_control", "DPO on random-head pairs (control)")):
        metrics = out / name / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            lines += [f"## {title}", "", f"Held-out pairs, step 0: `{m.get('eval_start')}`", "",
                      f"Held-out pairs, end: `{m.get('eval_end')}`", "", f"![curves]({name}/curves.png)", ""]
    if (out / "train_retrieval").exists():
        lines += ["Reproduce at full scale: `accelerate launch --config_file jobs/configs/accelerate/zero1.yaml "
                  "--num_processes 4 -m trainer.dpo --config jobs/configs/train_paper.yaml --pairs PAIRS --out OUT`", ""]
    results = out / "eval" / "results.md"
    if results.exists():
        lines += ["## Long-context evaluation (base vs trained vs control)", "",
                  "The demo suite is small: read the intervals, not the point estimates.", "",
                  results.read_text(), "![by length](eval/scores_by_length.png)", "![overall](eval/overall.png)", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path
