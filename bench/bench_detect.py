"""Detection benchmark: decode-row scoring vs a full-eager-attention reference vs plain greedy generation.

Each method runs in its own subprocess (so peak RSS is its own) on the same 4K-token trials; the
reference teacher-forces the tokens the fast path generated, so the scores must agree.

    python bench/bench_detect.py --length 4000 --trials 3 [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def _trials(tokenizer, length: int, n: int):
    from retrieval_heads.niah import build_prompt, builtin_needles

    needles = builtin_needles()
    return [build_prompt(tokenizer, needles[i % len(needles)], length, 0.25 + 0.5 * (i % 2)) for i in range(n)]


def worker(mode: str, length: int, n: int, records: Path) -> dict:
    import torch

    from retrieval_heads.detect import eos_ids, greedy_decode_scored, load_model, reference_scores

    model, tokenizer = load_model(MODEL, "float32")
    prompts = _trials(tokenizer, length, n)
    seconds, extra = [], {}
    if mode == "fast":
        out = []
        for p in prompts:
            t0 = time.perf_counter()
            generated, scores = greedy_decode_scored(model, p, 50, eos_ids(model, tokenizer))
            seconds.append(time.perf_counter() - t0)
            out.append({"generated": generated, "scores": scores.tolist()})
        records.write_text(json.dumps(out))
        extra["tokens"] = [len(r["generated"]) for r in out]
    elif mode == "reference":
        saved = json.loads(records.read_text())
        diffs = []
        for p, r in zip(prompts, saved):
            t0 = time.perf_counter()
            ref = reference_scores(model, p.input_ids, r["generated"], p.answer_span)
            seconds.append(time.perf_counter() - t0)
            diffs.append(float((ref - torch.tensor(r["scores"], dtype=torch.float64)).abs().max()))
        extra["max_abs_diff"] = max(diffs)
        extra["score_sum"] = sum(sum(map(sum, r["scores"])) for r in saved)
    elif mode == "generate":
        saved = json.loads(records.read_text())
        for p, r in zip(prompts, saved):
            ids = torch.tensor([p.input_ids])
            k = max(1, len(r["generated"]))
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                               do_sample=False)
            seconds.append(time.perf_counter() - t0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": mode, "seconds_per_trial": sum(seconds) / len(seconds), "peak_rss_gb": peak_gb,
            "prompt_tokens": len(prompts[0].input_ids), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    parser.add_argument("--write", help="markdown file to update with a '## Retrieval-head detection' section")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(worker(args.mode, args.length, args.trials, Path(args.records))))
        return
    from retrieval_heads.models import ensure_embedded_model

    ensure_embedded_model()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "records.json"
        for mode in ("fast", "reference", "generate"):
            cmd = [sys.executable, __file__, "--mode", mode, "--length", str(args.length), "--trials", str(args.trials),
                   "--records", str(records)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(results[mode]), flush=True)
    fast, ref, gen = results["fast"], results["reference"], results["generate"]
    section = "\n".join([
        "## Retrieval-head detection",
        "",
        f"Command: `python bench/bench_detect.py --length {args.length} --trials {args.trials} "
        "--write docs/BENCHMARKS.md`",
        f"(embedded model, fp32, {fast['prompt_tokens']}-token prompts, {args.trials} trials, "
        f"tokens generated {fast['tokens']}).",
        "",
        "| method | s / trial | peak RSS (GB) |",
        "|---|---|---|",
        f"| decode-row scoring (`retmask detect`) | {fast['seconds_per_trial']:.2f} | {fast['peak_rss_gb']:.2f} |",
        f"| full eager T x T reference | {ref['seconds_per_trial']:.2f} | {ref['peak_rss_gb']:.2f} |",
        f"| plain greedy `generate` (SDPA), same tokens | {gen['seconds_per_trial']:.2f} | {gen['peak_rss_gb']:.2f} |",
        "",
        f"- speed-up over the reference: **{ref['seconds_per_trial'] / fast['seconds_per_trial']:.1f}x** "
        "(target >= 8x)",
        f"- cost relative to plain generation: **{fast['seconds_per_trial'] / gen['seconds_per_trial']:.2f}x** "
        "(target <= 1.25x)",
        f"- max |score difference| vs the reference: **{ref['max_abs_diff']:.1e}** (target <= 1e-6; total score "
        f"mass {ref['score_sum']:.2f})",
        "",
    ])
    print(section)
    if args.write:
        write_section(Path(args.write), "## Retrieval-head detection", section)


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) one '## ' section of a markdown file, keeping the others."""
    fresh = "# Benchmarks\n\nFigures measured on the project's 2-core CPU machine unless a section says otherwise.\n"
    text = path.read_text() if path.exists() else fresh
    parts = text.split("\n## ")
    head, rest = parts[0], ["## " + p for p in parts[1:]]
    rest = [p for p in rest if not p.startswith(heading)] + [section]
    path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(p.rstrip("\n") + "\n" for p in rest))


if __name__ == "__main__":
    main()
