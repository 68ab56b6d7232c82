"""Evaluate checkpoints on the synthetic long-context suite (before/after DPO), paired against the first.

    python -m jobs.eval --models base=smollm2-135m-instruct,trained=runs/train/final --out runs/eval [--demo]

Writes results.json, results.md, samples.jsonl, scores_by_length.png and overall.png under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from pipeline.engine import EngineConfig
from pipeline.evaluate import EvalConfig, evaluate
from retrieval_heads.errors import RetmaskError, run_cli


def parse_models(text: str) -> dict[str, str]:
    """``name=path,name=path`` -> ordered dict (the first is the baseline)."""
    models: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RetmaskError(f"--models entry {item!r} is not name=path; e.g. --models base=smollm2-135m-instruct,trained=runs/train/final")
        if name in models:
            raise RetmaskError(f"--models names {name!r} twice; give every checkpoint its own name")
        models[name] = path
    return models


def parse_args(argv: list[str] | None = None) -> tuple[EvalConfig, str]:
    """Command line -> (config, output directory)."""
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="name=path,...; the first is the baseline")
    parser.add_argument("--out", required=True)
    parser.add_argument("--demo", action="store_true", help="CPU-sized suite (EvalConfig.demo): 1K prompts, 3 per task")
    parser.add_argument("--tasks", help=f"default: {','.join(defaults.tasks)}")
    parser.add_argument("--lengths", help=f"prompt lengths in tokens; default: {','.join(map(str, defaults.lengths))}")
    parser.add_argument("--samples", type=int, help=f"samples per task x length; default: {defaults.samples_per_cell}")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-tokens", type=int, help="answer budget for every task (default: per task, 32-64)")
    parser.add_argument("--bootstrap", type=int, help=f"bootstrap replicates; default: {defaults.bootstrap}")
    parser.add_argument("--no-perplexity", action="store_true")
    parser.add_argument("--dtype", default=EngineConfig.dtype)
    parser.add_argument("--kv-cache-gb", type=float, help="vLLM KV cache size (CPU default 1 GiB)")
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args(argv)

    engine = dataclasses.replace(EngineConfig(), dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                 tensor_parallel_size=args.tensor_parallel_size,
                                 kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None)
    base = EvalConfig.demo(parse_models(args.models)) if args.demo else EvalConfig(models=parse_models(args.models))
    given = {"tasks": args.tasks and tuple(t for t in args.tasks.split(",") if t),
             "lengths": args.lengths and tuple(int(x) for x in args.lengths.split(",") if x),
             "samples_per_cell": args.samples, "bootstrap": args.bootstrap}
    config = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None}, seed=args.seed,
                                 max_tokens=args.max_tokens, perplexity=not args.no_perplexity, engine=engine)
    return config, args.out


def main(argv: list[str] | None = None) -> None:
    config, out = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = evaluate(config, out)
    for name, ckpt in results["checkpoints"].items():
        lo, hi = ckpt["overall"]["ci"]
        line = f"{name}: overall {100 * ckpt['overall']['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
        if name in results["paired"]:
            d = results["paired"][name]["overall"]
            line += f"; vs {results['paired'][name]['vs']}: {100 * d['mean']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"
        print(line)
    print(f"wrote {out}/results.json, results.md, samples.jsonl, scores_by_length.png, overall.png")


if __name__ == "__main__":
    run_cli(main)
