"""Eval throughput: the long-context suite through vLLM (``GatedLLM``, one batched call) vs Hugging Face ``generate``.

Both answer the same samples greedily with the same answer budgets, each in its own subprocess, one after
the other; model load time is reported apart from answering time.

    python bench/bench_eval.py --tasks niah_single,niah_multivalue,qa --lengths 1000,2000 --samples 3 \\
        [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def _suite(args):
    from transformers import AutoTokenizer

    from pipeline.evaluation.fitting import build_suite
    from retrieval_heads.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    lengths = tuple(int(x) for x in args.lengths.split(","))
    return build_suite(tokenizer, tuple(args.tasks.split(",")), lengths, args.samples, seed=0, max_context=8192)


def run_vllm(args) -> dict:
    from vllm import SamplingParams

    from pipeline.engine import EngineConfig, GatedLLM

    samples = _suite(args)
    max_model_len = max(s.num_tokens + s.max_tokens for s in samples)
    t0 = time.perf_counter()
    llm = GatedLLM.from_config(EngineConfig(model=MODEL, max_model_len=max_model_len))
    t1 = time.perf_counter()
    outs = llm.generate([s.prompt for s in samples],
                        [SamplingParams(temperature=0.0, max_tokens=s.max_tokens) for s in samples])
    t2 = time.perf_counter()
    llm.close()
    setup = (f"bfloat16 (checkpoint dtype), eager, OpenMP threads on all {os.cpu_count()} cores "
             "(EngineConfig.cpu_reserved_cores=0)")
    return _report("vllm", samples, [o.text for o in outs], t1 - t0, t2 - t1, setup)


def run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrieval_heads.models import resolve_model

    # As many threads as the vLLM worker gets (all cores). On a machine shared with other jobs, pass
    # --hf-threads 1: there a second OpenMP thread mostly waits at barriers (measured ~3x slower under load).
    torch.set_num_threads(args.hf_threads)
    samples = _suite(args)
    path = resolve_model(MODEL)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.hf_dtype)).eval()
    t1 = time.perf_counter()
    texts = []
    for i in range(0, len(samples), args.hf_batch):
        batch = samples[i: i + args.hf_batch]
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": s.prompt}], tokenize=False,
                                                  add_generation_prompt=True) for s in batch]
        enc = tokenizer(rendered, add_special_tokens=False, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max(s.max_tokens for s in batch), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        # A batch decodes to its longest budget; cut each answer to its own budget so the scoring is the same.
        texts += [tokenizer.decode(row[enc["input_ids"].shape[1]:][: s.max_tokens], skip_special_tokens=True)
                  for row, s in zip(out, batch)]
    t2 = time.perf_counter()
    setup = f"{args.hf_dtype}, SDPA, batch {args.hf_batch}, {torch.get_num_threads()} torch threads"
    return _report("hf", samples, texts, t1 - t0, t2 - t1, setup)


def _report(name, samples, texts, load_s, answer_s, setup) -> dict:
    from pipeline.evaluation.tasks import get_task

    scores = [get_task(s.task).score(t, s.answers) for s, t in zip(samples, texts)]
    return {"engine": name, "setup": setup, "samples": len(samples),
            "prompt_tokens": sum(s.num_tokens for s in samples),
            "load_s": load_s, "answer_s": answer_s, "samples_per_s": len(samples) / answer_s,
            "mean_score": sum(scores) / len(scores), "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="niah_single,niah_multivalue,qa")
    parser.add_argument("--lengths", default="1000,2000")
    parser.add_argument("--samples", type=int, default=3, help="samples per task x length")
    parser.add_argument("--hf-batch", type=int, default=1, help="HF batch size (left padding)")
    parser.add_argument("--hf-threads", type=int, default=os.cpu_count(), help="torch threads for HF")
    parser.add_argument("--hf-dtype", default="float32", help="float32: fast on CPU; bfloat16 matches vLLM's dtype")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--write", help="markdown file to update with a '## Evaluation' section")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_vllm(args) if args.engine == "vllm" else run_hf(args)))
        return
    from retrieval_heads.models import ensure_embedded_model

    ensure_embedded_model()
    results, loads = {}, [os.getloadavg()[0]]
    for engine in ("vllm", "hf"):
        cmd = [sys.executable, __file__, "--engine", engine, "--tasks", args.tasks, "--lengths", args.lengths,
               "--samples", str(args.samples), "--hf-batch", str(args.hf_batch), "--hf-dtype", args.hf_dtype,
               "--hf-threads", str(args.hf_threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[engine] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps({k: v for k, v in results[engine].items() if k != "scores"}), flush=True)
        loads.append(os.getloadavg()[0])
    v, h = results["vllm"], results["hf"]
    agree = sum(a == b for a, b in zip(v["scores"], h["scores"])) / len(v["scores"])
    command = (f"python bench/bench_eval.py --tasks {args.tasks} --lengths {args.lengths} --samples {args.samples} "
               f"--hf-batch {args.hf_batch} --hf-dtype {args.hf_dtype} --hf-threads {args.hf_threads} "
               "--write docs/BENCHMARKS.md")
    rows = [f"| {r['engine']} | {r['setup']} | {r['load_s']:.1f} | {r['answer_s']:.1f} | {r['samples_per_s']:.3f} "
            f"| {100 * r['mean_score']:.1f} |" for r in (v, h)]
    shared = max(loads) > (os.cpu_count() or 1)
    section = "\n".join([
        "## Evaluation",
        "",
        f"Command: `{command}`",
        f"(embedded model; {v['samples']} suite samples, {v['prompt_tokens']} prompt tokens; greedy, per-task answer "
        "budgets 32-64 tokens).",
        "",
        "| engine | setup | load (s) | answering (s) | samples / s | mean score |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"- vLLM / HF throughput: **{v['samples_per_s'] / h['samples_per_s']:.2f}x**; same per-sample score on "
        f"{100 * agree:.0f}% of samples (bf16 vs the HF dtype can flip a greedy token).",
        f"- 1-minute load average before/between/after the runs: {', '.join(f'{x:.1f}' for x in loads)} on "
        f"{os.cpu_count()} cores"
        + (" (machine shared with other jobs: absolute times are inflated, the ratio is the figure to read)."
           if shared else "."),
        "",
    ])
    print(section)
    if args.write:
        from bench_detect import write_section

        write_section(Path(args.write), "## Evaluation", section)


if __name__ == "__main__":
    main()
