"""DPO trainer benchmark, side by side in one run, on the embedded SmolLM2-135M-Instruct (CPU).

1. ``trainer.dpo.train()`` step time vs a plain TRL ``DPOTrainer`` script with the same model, pairs and
   hyperparameters (demo preset, 8 pairs per step), in alternating order so load drifts hit both.
2. Peak RSS (each variant in its own subprocess): full fine-tune vs LoRA, each with and without
   ``precompute_ref_log_probs``.
3. A paper-scale projection (8B, 512-pair steps, 4 GPUs): an analytic FLOP/memory model whose pieces the
   measurements above check. A projection, not a measurement.

    python bench/bench_train.py                 # ~20 min on 2 shared CPU cores
    python bench/bench_train.py --write-docs    # also (re)writes "## DPO trainer" in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (runner, TrainConfig overrides)
    "train": ("retmask", {}),
    "plain_trl": ("plain", {}),
    "train_precompute": ("retmask", {"precompute_ref_log_probs": True}),
    "train_lora": ("retmask", {"lora": True}),
    "train_lora_precompute": ("retmask", {"lora": True, "precompute_ref_log_probs": True}),
}
GENERIC = ["I don't know.", "Sorry, I can't tell.", "No idea, sorry.", "That depends on many things."]


def write_pairs(out: Path, n: int) -> None:
    """Pairs whose chosen answer uses the prompt's facts and whose rejected answer ignores them."""
    sys.path.insert(0, str(ROOT))
    from pipeline.shard_schema import make_row
    from pipeline.shard_writer import open_run

    rng = random.Random(0)
    rows = []
    for i in range(n):
        city, number = rng.choice(["Lisbon", "Osaka", "Quito", "Perth", "Hanoi"]), rng.randint(10, 99)
        prompt = f"I live in {city} and my locker number is {number}. Where do I live, and what is my locker number?"
        answer = f"You live in {city}, and your locker number is {number}."
        generic = rng.choice(GENERIC)
        rows.append(make_row(f"b{i:04d}", prompt, 0, 50, {"normal": (answer, 16, "stop"),
                                                          "retrieval_masked": (generic, 8, "stop")}))
    run = {"model": {"id": "bench", "hash": "0"}, "masks": {}, "sampling": {}, "seed": 0, "packages": {}}
    writer = open_run(out, run, ["normal", "retrieval_masked"])
    writer.write_shard(rows)
    writer.close()


# ---------------------------------------------------------------------------------------------------
# one variant, in a child process


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.first_step_at = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.first_step_at = self.first_step_at or time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def run_variant(name: str, pairs: Path, work: Path, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    runner, overrides = VARIANTS[name]
    timer = step_timer()
    if runner == "retmask":
        from trainer.config import TrainConfig
        from trainer.dpo import train

        config = TrainConfig.from_preset("demo", pairs=str(pairs), output_dir=str(work), max_steps=steps,
                                         eval_fraction=0.0, save_steps=10_000, allow_off_policy=True, **overrides)
        train(config, callbacks=[timer])
    else:
        plain_trl(pairs, work, steps, timer)
    return {
        "variant": name, "step_s": timer.times, "setup_s": timer.first_step_at - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": threads,
    }


def plain_trl(pairs: Path, work: Path, steps: int, timer) -> None:
    """What a user would write with TRL alone: read the shards, build the dataset, train with the same settings."""
    import pyarrow.parquet as pq
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from retrieval_heads.models import resolve_model

    manifest = json.loads((pairs / "manifest.json").read_text())
    rows = [r for s in manifest["shards"] for r in pq.read_table(pairs / s["file"]).to_pylist()]
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
        "chosen": [[{"role": "assistant", "content": r["normal__text"]}] for r in rows],
        "rejected": [[{"role": "assistant", "content": r["retrieval_masked__text"]}] for r in rows],
    })
    model = resolve_model("smollm2-135m-instruct")
    args = DPOConfig(
        output_dir=str(work), model_init_kwargs={"dtype": "float32"}, learning_rate=1e-5,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-6}, warmup_steps=0.1,
        weight_decay=0.1, adam_beta2=0.95, per_device_train_batch_size=2, gradient_accumulation_steps=4,
        max_steps=steps, beta=0.1, max_length=512, bf16=False, gradient_checkpointing=False, seed=42,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
    )
    DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(model),
               callbacks=[timer]).train()


# ---------------------------------------------------------------------------------------------------
# driver


def mean_sequence_tokens(pairs: Path) -> float:
    """Mean prompt+response tokens per sequence, as TRL tokenizes them (chat template included)."""
    from transformers import AutoTokenizer

    from retrieval_heads.models import resolve_model
    from trainer.data import load_pairs

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    ds = load_pairs(pairs, eval_fraction=0.0).train
    lengths = [len(tok.apply_chat_template(r["prompt"] + r[side], tokenize=True)["input_ids"])
               for r in ds for side in ("chosen", "rejected")]
    return sum(lengths) / len(lengths)


def child(name: str, pairs: Path, work: Path, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--pairs", str(pairs), "--work", str(work / name),
           "--steps", str(steps), "--threads", str(threads)]
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name:24s} steps {['%.1f' % s for s in result['step_s']]} s, peak RSS {result['peak_rss_mb']:.0f} MB",
          file=sys.stderr)
    return result


def timed(result: dict) -> float:
    # the first step pays one-off allocation and kernel setup
    return statistics.median(result["step_s"][1:] or result["step_s"])


def projection(m: dict) -> dict:
    """Paper scale from the analytic model; the measured byte and FLOP shares say whether the model holds."""
    params, gpus, mfu, peak = 8.03e9, 4, 0.40, 989e12  # Llama-3.1-8B; H100 dense bf16 peak
    seq = 700  # assumed mean prompt+response tokens per sequence under the 1024 cap (no paper figure)
    tokens = 512 * 2 * seq
    flops = (6 + 2 + 2) * params * tokens  # policy fwd+bwd, checkpoint recompute, reference fwd
    step_s = flops / (gpus * peak * mfu)
    # per GPU, ZeRO-1 bf16: bf16 weights + bf16 grads + fp32 master/m/v sharded 4 ways + bf16 reference
    zero1 = (2 + 2 + 12 / gpus + 2) * params / 1e9
    return {
        "step_s": step_s, "step_s_precompute": step_s * 8 / 10, "tokens_per_step": tokens,
        "gb_zero1": zero1, "gb_zero1_precompute": zero1 - 2 * params / 1e9,
        "gb_zero2": (2 + (2 + 12) / gpus + 2) * params / 1e9, "gb_lora": (2 + 0.1) * params / 1e9,
        "measured_state_bytes": m["state_bytes"], "measured_ref_bytes": m["ref_bytes"],
        "measured_ref_share": m["ref_share"], "overhead": m["ratio"],
    }


def report(results: dict[str, list[dict]], args, n_params: int) -> str:
    t = {k: [timed(r) for r in results[k]] for k in VARIANTS}
    rss = {k: max(r["peak_rss_mb"] for r in results[k]) for k in VARIANTS}
    ratio = statistics.median(t["plain_trl"]) / statistics.median(t["train"])
    measured = {
        "ratio": ratio,
        "state_bytes": (rss["train"] - rss["train_lora"]) * 2**20 / n_params,
        "ref_bytes": (rss["train"] - rss["train_precompute"]) * 2**20 / n_params,
        "ref_share": 1 - statistics.median(t["train_precompute"]) / statistics.median(t["train"]),
    }
    p = projection(measured)
    load = results.get("load_avg", os.getloadavg())
    steps = [x for k in ("train", "plain_trl") for r in results[k] for x in r["step_s"][1:]]
    spread = (max(steps) - min(steps)) / statistics.median(steps)
    lines = [
        "## DPO trainer",
        "",
        f"Command: `python bench/bench_train.py{f' --threads {args.threads}' if args.threads != 1 else ''}"
        f"{' --write-docs' if args.write_docs else ''}` "
        f"({args.rounds} rounds of train() and plain TRL in alternating order, {args.steps} steps each, "
        f"median of steps 2..{args.steps}).",
        f"Machine: {os.cpu_count()} CPU cores{' **shared with other jobs**' if load[0] > 2.5 else ''} "
        f"(load average {load[0]:.1f} at the end), "
        f"{args.threads} torch thread(s); embedded SmolLM2-135M-Instruct ({n_params / 1e6:.0f}M params), fp32, "
        f"demo preset (8 pairs per optimizer step as 4 passes of 2, max_length 512), {results['seq_tokens']:.0f} "
        "tokens per sequence on average (chat template + prompt + response).",
        "",
        "| variant | step time (s, median per round) | peak RSS (MB) |",
        "|---|---|---|",
    ]
    for k in VARIANTS:
        lines.append(f"| {k} | {', '.join('%.2f' % x for x in t[k])} | {rss[k]:.0f} |")
    lines += [
        "",
        f"- `train()` vs plain TRL: **{ratio:.2f}x** the plain script's speed (plain step time / train() step time; "
        f"target >= 0.95x); single steps spread {spread:.0%} (max - min over median) on this machine, so "
        "the two are equal within noise. Both run the same `DPOTrainer`; train() adds work only outside the "
        "step loop (pair filters, split, metrics, plot): setup "
        f"{statistics.median(r['setup_s'] for r in results['train']):.0f} s "
        f"vs {statistics.median(r['setup_s'] for r in results['plain_trl']):.0f} s before the first step.",
        f"- Precomputed reference: peak RSS {rss['train']:.0f} -> {rss['train_precompute']:.0f} MB "
        f"({measured['ref_bytes']:.1f} B/param freed; a fp32 reference copy is 4), step time "
        f"-{measured['ref_share']:.0%} (the model below expects -25% without checkpointing: 2 of 8 FLOP units).",
        f"- LoRA (r=16, all linear layers): peak RSS {rss['train']:.0f} -> {rss['train_lora']:.0f} MB "
        f"({measured['state_bytes']:.1f} B/param freed, below the 16 B/param of state LoRA drops: fp32 grads 4 + "
        "AdamW m, v 8 + the reference copy 4, replaced by switching the adapter off). At 135M params and ~70-token "
        "sequences the rest of the process peak (activations, temporaries, ~0.5 GB of imported libraries) is "
        f"{rss['train_lora'] / 1024:.1f} GB and does not shrink with LoRA; at 8B the state term dominates "
        "(projection below). With precompute "
        f"{rss['train_lora_precompute']:.0f} MB: LoRA keeps no reference copy to drop.",
        "- Step times of the precompute and LoRA rows are single steps (step 2 of 2): indicative only.",
        "",
        "**Projection, not a measurement** — RetMask paper scale: Llama-3.1-8B, 512 pairs per step, 4 x H100, "
        "ZeRO-1, bf16, gradient checkpointing. Assumptions: 700 tokens per sequence on average (1024 cap), 40% MFU "
        "of 989 dense bf16 TFLOP/s per GPU, FLOPs = (6 train + 2 recompute + 2 reference) x params x tokens; memory "
        "per GPU = bf16 weights 2 + bf16 grads 2 + fp32 master/m/v 12/4 + bf16 reference 2 bytes per parameter "
        "(ZeRO-2 also shards the grads), activations excluded.",
        "",
        f"- step ({p['tokens_per_step'] / 1e6:.2f}M tokens): ~{p['step_s']:.0f} s; with precomputed reference "
        f"~{p['step_s_precompute']:.0f} s (plus one reference pass over the data). train()'s step loop is TRL's own "
        f"(measured {ratio:.2f}x above), so it adds nothing here.",
        f"- 2 epochs over N pairs: N/256 steps, e.g. 50k pairs -> {50_000 / 256:.0f} steps -> "
        f"~{50_000 / 256 * p['step_s'] / 3600:.1f} h.",
        f"- memory per GPU: ZeRO-1 ~{p['gb_zero1']:.0f} GB (~{p['gb_zero1_precompute']:.0f} GB with precompute), "
        f"ZeRO-2 ~{p['gb_zero2']:.0f} GB, LoRA ~{p['gb_lora']:.0f} GB, each plus activations: ZeRO-1 full fine-tuning "
        "fits an 80 GB H100 only with checkpointing and 1-2 pairs per device, as the paper ran it.",
        "- unverified here: multi-GPU, DeepSpeed, bf16 on GPU (this machine has none).",
        "",
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    """Insert or replace only the "## DPO trainer" section (others may be editing other sections)."""
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find("## DPO trainer")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per train()/plain TRL run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of train() vs plain TRL, order alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the raw per-variant results here")
    ap.add_argument("--from-json", type=Path, help="re-render the report from a --json file instead of measuring")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.pairs, args.work, args.steps, args.threads)))
        return

    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from retrieval_heads.models import resolve_model

    with torch.device("meta"):  # shapes only, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model("smollm2-135m-instruct")))
    n_params = sum(p.numel() for p in model.parameters())
    results: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        measure(results, args)
    section = report(results, args, n_params)
    print(section)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.write_docs:
        write_docs(section)


def measure(results: dict[str, list[dict]], args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pairs, work = Path(tmp) / "pairs", Path(tmp) / "work"
        write_pairs(pairs, 8 * args.steps)
        results["seq_tokens"] = mean_sequence_tokens(pairs)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            for name in ("train", "plain_trl") if r % 2 == 0 else ("plain_trl", "train"):
                results[name].append(child(name, pairs, work / f"r{r}", args.steps, args.threads))
        for name in ("train_precompute", "train_lora", "train_lora_precompute"):  # peak RSS is reached by step 2
            results[name].append(child(name, pairs, work, min(args.steps, 2), args.threads))
    results["load_avg"] = os.getloadavg()


if __name__ == "__main__":
    main()
