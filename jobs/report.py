"""REPORT.md for a demo run: every figure and plot, and the commands that reproduce each stage."""

from __future__ import annotations

import json
from pathlib import Path


def verdict(paired: dict, name: str) -> str:
    """One honest sentence about a paired overall difference (points) and its 95% interval."""
    mean, (low, high) = 100 * paired["overall"]["mean"], (100 * x for x in paired["overall"]["ci"])
    span = f"{mean:+.1f} points, 95% interval [{low:+.1f}, {high:+.1f}]"
    if low > 0:
        return f"{name} scores higher than {paired['vs']}: {span}."
    if high < 0:
        return f"{name} scores lower than {paired['vs']}: {span}."
    return (f"{name} vs {paired['vs']}: {span}; the interval includes 0, so this run shows no difference "
            "distinguishable from noise.")


STUDY_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"


def _study() -> list[str]:
    """What the powered, pre-registered study found (docs/STUDY.md), so the demo's small number is read next
    to it."""
    head = ("What a powered run finds: the pre-registered RetMask vs control study on this model (docs/STUDY.md, "
            "`retmask study --config jobs/configs/study.yaml`)")
    if not STUDY_RESULTS.exists():
        return [head + " reports in docs/RESULTS.md; it has not been run to completion yet."]
    found = [line for line in STUDY_RESULTS.read_text().splitlines() if line.startswith("Primary outcome")]
    return [head + ": " + (found[0] + " Tables, head maps and run notes: docs/RESULTS.md." if found
                           else "see docs/RESULTS.md.")]


def _default_suite() -> str:
    from pipeline.evaluation.config import EvalConfig

    cfg = EvalConfig()
    return f"{', '.join(str(n) for n in cfg.lengths)} tokens, {cfg.samples_per_cell} samples per task x length"


def _timings(timings: dict) -> list[str]:
    lines = ["## Stage timings", "", "| stage | wall time (s) | peak RSS (GiB) |", "|---|---|---|"]
    lines += [f"| {name} | {t['seconds']:.0f} | {t['peak_rss_gb']:.2f} |" for name, t in timings.items()]
    total = sum(t["seconds"] for t in timings.values())
    peak = max((t["peak_rss_gb"] for t in timings.values()), default=0.0)
    return lines + [f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | **{peak:.2f}** |", "",
                    "Peak RSS sums the demo process and all its children (Ray, vLLM engines); shared pages count "
                    "once per process, so it is an upper bound.", ""]


def _detect(cfg, out: Path) -> list[str]:
    s = json.loads((out / "detect" / "summary.json").read_text())
    sp = s["sparsity"]
    lines = ["## Retrieval heads", "",
             f"{s['trials_counted']} of {s['trials_run']} NIAH trials (lengths {list(cfg.detect_lengths)}, "
             f"{len(cfg.detect_depths)} depths, {cfg.detect_needles} needles) passed the ROUGE-1 filter. "
             f"{sp['share_above_threshold']:.1%} of {sp['num_heads']} heads score > 0.1; Gini {sp['gini']:.3f}, "
             f"top-5% mass {sp['top5pct_mass']:.2f}.", "",
             "| head | score | counted trials |", "|---|---|---|"]
    lines += [f"| {h['head']} | {h['score']:.3f} | {h['counted_trials']} |" for h in s["top_heads"][:10]]
    return lines + ["", "![head scores](detect/head_scores.png)", "",
                    f"Reproduce: `retmask detect --model {cfg.model} --out {out}/detect "
                    f"--lengths {','.join(map(str, cfg.detect_lengths))} --needles {cfg.detect_needles}`. "
                    "On a GPU cluster: `ray job submit --working-dir . -- python -m jobs.detect --model MODEL "
                    "--lengths 1000,2000,4000,8000,16000,32000 --workers 8 --gpus-per-worker 1 --out OUT`.", ""]


def _ablate(cfg, out: Path) -> list[str]:
    return ["## Causality: masking retrieval heads vs random heads", "",
            f"NIAH accuracy at {list(cfg.ablate_lengths)} tokens ({cfg.ablate_dtype}), with the top-{cfg.ablate_k} "
            "retrieval heads masked and with as many random non-retrieval heads masked (one row per seed).", "",
            (out / "ablate" / "ablation.md").read_text().rstrip(), "", "![ablation](ablate/ablation.png)", "",
            f"Reproduce: `retmask ablate --scores {out}/detect/head_scores.json --out {out}/ablate --k {cfg.ablate_k} "
            f"--lengths {','.join(map(str, cfg.ablate_lengths))} --dtype {cfg.ablate_dtype}`", ""]


def _pairs(out: Path) -> list[str]:
    plots = sorted(p.name for p in (out / "inspect").glob("*.png"))
    return ["## Preference pairs", "", "```", (out / "inspect" / "report.txt").read_text().rstrip(), "```", "",
            *[f"![{p}](inspect/{p})" for p in plots], "",
            f"Inspect: `retmask inspect {out}/generate`. Reproduce at full scale (Llama-3.1-8B-Instruct, the paper's "
            "sampling): `ray job submit --working-dir . -- python -m jobs.generate --config "
            "jobs/configs/generate_llama31_8b.yaml`", ""]


def _training(out: Path, name: str, title: str) -> list[str]:
    m = json.loads((out / name / "metrics.json").read_text())
    stats_path = out / name / "data_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    start, end = m.get("eval_start") or {}, m.get("eval_end") or {}

    def fmt(e: dict) -> str:
        keys = ("loss", "rewards/accuracies", "rewards/margins")
        return ", ".join(f"{k} {e[k]:.3f}" for k in keys if k in e) or "n/a"

    lines = [f"## {title}", ""]
    if stats:
        lines += [f"Pairs: `{json.dumps({k: v for k, v in stats.items() if not isinstance(v, dict)})}`", ""]
    return lines + [f"DPO on held-out pairs at step 0: {fmt(start)}.", "",
                    f"At step {m.get('global_step')}: {fmt(end)}.", "", f"![curves]({name}/curves.png)", ""]


def _eval(out: Path) -> list[str]:
    results = json.loads((out / "eval" / "results.json").read_text())
    lines = ["## Long-context evaluation (base vs trained)", ""]
    lines += [f"- {verdict(p, name)}" for name, p in results["paired"].items()]
    ppl = results.get("perplexity") or {}
    if all(ppl.values()) and ppl:
        shown = ", ".join(f"{n} {v['perplexity']:.2f}" for n, v in ppl.items())
        lines.append(f"- Held-out chat perplexity (quality guard): {shown}.")
    table = (out / "eval" / "results.md").read_text().rstrip().splitlines()
    lines += ["", "The demo suite is small and the demo's DPO run is a handful of steps on a 135M model: read the "
              "intervals, not the point estimates. The paper's effect (+2.28 HELMET points) comes from thousands of "
              "pairs with 2048-token responses on 8B models.", "",
              *("#" + line if line.startswith("#") else line for line in table), "",
              "![by length](eval/scores_by_length.png)", "![overall](eval/overall.png)", "",
              *_study(), "",
              "Reproduce: `retmask eval --models base=MODEL,retmask=TRAINED/final --out OUT` (default suite: "
              f"lengths {_default_suite()}); HELMET on a trained checkpoint: see README.", ""]
    return lines


def write_report(cfg, out: Path, timings: dict) -> Path:
    lines = [f"# RetMask demo report: {cfg.model}", ""] + _timings(timings)
    if (out / "detect" / "summary.json").exists():
        lines += _detect(cfg, out)
    if (out / "ablate" / "ablation.md").exists():
        lines += _ablate(cfg, out)
    if (out / "inspect" / "report.txt").exists():
        lines += _pairs(out)
    for name, title in (("train_retrieval", "DPO on retrieval-masked pairs"),
                        ("train_control", "DPO on random-head pairs (control)")):
        if (out / name / "metrics.json").exists():
            lines += _training(out, name, title)
    if (out / "train_retrieval").exists():
        lines += ["Reproduce at full scale: `accelerate launch --config_file jobs/configs/accelerate/zero1.yaml "
                  "--num_processes 4 -m jobs.train --config jobs/configs/train_paper.yaml --pairs PAIRS --out OUT` "
                  "(or `retmask train --workers 4 --gpu ...` on a Ray cluster)", ""]
    if (out / "eval" / "results.json").exists():
        lines += _eval(out)
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path
