"""Mixed vs switched batches: a continuous-batching model of one GPU, replaying measured answer lengths.

Why a model: ``GatedLLM.generate`` sets one head mask for the whole engine, so an actor batch of P prompts runs
as V engine calls (normal, then retrieval_masked, then random_masked), each drained to its longest answer
before the mask switches. A per-request gate would let all variants of all prompts share one stream. A CPU
does not show a GPU's batch effect (its decode step grows with the batch), so this script replays answer
lengths through a model of a GPU engine instead of measuring one. It is a model, not a measurement.

The engine model (vLLM V1-like; every number a flag, defaults for Llama-3.1-8B in bf16 on one 80 GB H100):

- at most ``max_num_seqs`` S running requests; a KV cache of K tokens (default: 0.9 x 80 GiB - 15.0 GiB of
  weights - 4 GiB of activations and CUDA graphs = 53 GiB at 128 KiB per token, 434,527 tokens);
- each step first serves the running requests in admission order (one decode token each, or the next chunk of
  a prefill), then admits waiting requests FIFO while a slot, KV room and the step's token budget
  (``max_num_batched_tokens``, default 8192; 0 = prefill ignored) last; a prefill that completes emits the
  first token; when the KV cache is full the last-admitted request is preempted and later recomputed (its
  prompt and the tokens it already generated are prefilled again), as vLLM does;
- step time, in units of one memory-bound decode step (t_step = the time to read the weights once):
  ``flat``: max(1, tokens in the step / knee), flat in batch size up to the compute knee (989 TFLOP/s over
  3.35 TB/s: 295 tokens per step for bf16, where a token's FLOPs equal 2 x params = the weight bytes);
  ``kv-read``: as flat, plus the time to read the KV cache each step (KV tokens held x 128 KiB / 16.06 GB of
  weights), which makes a full batch of long answers cost more than an empty one;
- each request decodes its answer length, capped at the budget B; variants of one prompt are separate
  requests (their prefix blocks are not shared: the gate salts the cache per mask).

Schedules over the same sampled requests: ``switched`` (per batch of P prompts, one drained engine call per
variant: today), ``batch-mixed`` (per batch, one drained call with all variants: a per-request gate that keeps
today's actor loop) and ``mixed`` (all variants of all prompts in one FIFO stream, prompt-major).

    python bench/sim_batching.py --out-dir runs/demo/generate --budget 2048 [--write docs/BENCHMARKS.md]
    python bench/sim_batching.py --synthetic lognormal --median 300 --sigma 1.0 --budget 2048
    python bench/sim_batching.py --lengths runs/bench_mixed.json --budget 2048   # lengths bench_mixed.py measured
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for bench_detect.write_section

GIB = 2 ** 30
PARAMS = 8.03e9  # Llama-3.1-8B
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V x 32 layers x 8 KV heads x 128 dims x bf16 = 128 KiB
KV_TOKENS = int((0.9 * 80 * GIB - 2 * PARAMS - 4 * GIB) // KV_BYTES_PER_TOKEN)  # 434,527
KNEE = 295  # H100 SXM: 989 dense bf16 TFLOP/s / 3.35 TB/s HBM3
KV_READ = KV_BYTES_PER_TOKEN / (2 * PARAMS)  # one KV token read, in weight reads
HEADING = "## Mixed vs switched batches (simulation)"
_NORMAL = NormalDist()


@dataclass
class Engine:
    """The modelled engine; defaults are one 80 GB H100 serving Llama-3.1-8B in bf16 (module docstring)."""

    max_num_seqs: int = 256
    kv_tokens: int = KV_TOKENS
    prefill_budget: int = 8192  # max_num_batched_tokens; 0 = prefill ignored (no step time, KV still held)
    knee: float = KNEE
    kv_read: float = KV_READ


@dataclass
class Run:
    """What one or more drained engine calls cost."""

    steps: int = 0
    flat: float = 0.0  # time in t_step, flat model
    kv_read: float = 0.0  # time in t_step, flat model plus KV reads
    tokens: int = 0  # generated tokens
    seq_steps: int = 0  # sum over steps of the requests served in the step
    preemptions: int = 0
    peak_kv: int = 0  # most KV tokens held after a step

    def add(self, other: "Run") -> "Run":
        for name in ("steps", "flat", "kv_read", "tokens", "seq_steps", "preemptions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.peak_kv = max(self.peak_kv, other.peak_kv)
        return self


def simulate(engine: Engine, prompt: np.ndarray, length: np.ndarray, order) -> Run:
    """One engine call: the requests ``order`` (indices into prompt/length) from an empty engine to drained."""
    S, K, T = engine.max_num_seqs, engine.kv_tokens, engine.prefill_budget
    too_big = [r for r in order if prompt[r] + length[r] > K]
    if too_big:
        raise ValueError(f"request {too_big[0]} needs {prompt[too_big[0]] + length[too_big[0]]} KV tokens > {K}")
    rid = np.full(S, -1)
    gen, target, kvt, need, seq = (np.zeros(S, dtype=np.int64) for _ in range(5))
    free, waiting, progress = list(range(S - 1, -1, -1)), deque(order), {}
    kv, counter, run = 0, 0, Run()

    def demand(r: int, budget: float) -> tuple[int, int]:
        """(tokens the step computes for admitting r, KV tokens it takes now)."""
        full = int(prompt[r]) + progress.get(r, 0)
        return (min(full, budget), min(full, budget)) if T else (1, full + 1)

    def account(tokens: np.ndarray, kv_held: np.ndarray, seqs: int) -> None:
        compute = tokens / engine.knee
        run.steps += len(tokens)
        run.flat += float(np.maximum(1.0, compute).sum())
        run.kv_read += float(np.maximum(1.0 + kv_held * engine.kv_read, compute).sum())
        run.seq_steps += seqs * len(tokens)
        run.peak_kv = max(run.peak_kv, int(kv_held.max()))

    while waiting or len(free) < S:
        act = np.flatnonzero(rid >= 0)
        act = act[np.argsort(seq[act])]
        n, jumped = len(act), False
        if n and not need[act].any():  # all decoding: jump to the next finish if nothing can be admitted
            blocked = not waiting or n == S
            if not blocked:
                tokens, taken = demand(waiting[0], T - n if T else math.inf)
                blocked = tokens <= 0 or kv + n + taken > K
            k = min(int((target[act] - gen[act]).min()), (K - kv) // n)
            if blocked and k >= 1:
                account(np.full(k, n), kv + n * np.arange(1, k + 1), n)
                gen[act] += k
                kvt[act] += k
                run.tokens += n * k
                kv += n * k
                jumped = True
        if not jumped:
            want = np.where(need[act] > 0, need[act], 1)
            chunk = np.clip(T - (np.cumsum(want) - want), 0, want) if T else want
            preempted = False
            while kv + int(chunk.sum()) > K:  # vLLM V1: preempt the last-admitted request, recompute it later
                last = act[-1]
                progress[int(rid[last])] = int(gen[last])
                waiting.appendleft(int(rid[last]))
                kv -= int(kvt[last])
                rid[last] = -1
                free.append(int(last))
                act, chunk, preempted = act[:-1], chunk[:-1], True
                run.preemptions += 1
            slots, chunks = list(act), list(chunk)
            budget = (T - int(chunk.sum())) if T else math.inf
            while waiting and free and not preempted and budget > 0:
                r = waiting[0]
                tokens, taken = demand(r, budget)
                if kv + int(sum(chunks)) + taken > K:
                    break
                waiting.popleft()
                s = free.pop()
                full = int(prompt[r]) + progress.get(r, 0)
                rid[s], gen[s], target[s], seq[s] = r, progress.pop(r, 0), length[r], counter
                need[s], kvt[s] = (full, 0) if T else (0, full)
                kv += 0 if T else full
                counter += 1
                slots.append(s)
                chunks.append(tokens)
                budget -= tokens
            if slots:
                sl, ch = np.array(slots), np.array(chunks)
                prefilling = need[sl] > 0
                need[sl] -= np.where(prefilling, ch, 0)
                emits = (~prefilling) | (need[sl] == 0)
                gen[sl] += emits
                run.tokens += int(emits.sum())
                kvt[sl] += ch
                kv += int(ch.sum())
                account(np.array([ch.sum()]), np.array([kv]), len(sl))
        done = np.flatnonzero((rid >= 0) & (gen >= target))
        kv -= int(kvt[done].sum())
        rid[done] = -1
        free.extend(int(s) for s in done)
    return run


def schedules(num_prompts: int, num_variants: int, batch: int) -> dict[str, list[list[int]]]:
    """Engine calls (each a FIFO list of request ids ``prompt * num_variants + variant``) per schedule."""
    batches = [range(b, min(b + batch, num_prompts)) for b in range(0, num_prompts, batch)]
    return {
        "switched": [[i * num_variants + v for i in b] for b in batches for v in range(num_variants)],
        "batch-mixed": [[i * num_variants + v for i in b for v in range(num_variants)] for b in batches],
        "mixed": [list(range(num_prompts * num_variants))],
    }


def run_schedule(engine: Engine, prompt: np.ndarray, length: np.ndarray, calls: list[list[int]]) -> Run:
    """Drained engine calls one after the other."""
    total = Run()
    for call in calls:
        total.add(simulate(engine, prompt, length, call))
    return total


# ---------------------------------------------------------------------------------------------------
# answer lengths


def fit_lognormal_censored(lengths: np.ndarray, censored: np.ndarray, sigma: float | None = None,
                           ) -> tuple[float, float]:
    """(mu, sigma) of log-length by maximum likelihood, treating ``censored`` lengths as 'at least this long'.

    With ``sigma`` given only mu is fitted: a heavily truncated output pins the share beyond the cap (so mu
    given sigma) but hardly the shape of the tail.
    """
    y, c = np.log(lengths[~censored]), np.log(lengths[censored])
    erfc = np.frompyfunc(math.erfc, 1, 1)

    def loglik(mu: np.ndarray, s: np.ndarray) -> np.ndarray:
        ll = -len(y) * np.log(s) - ((y[None, :] - mu[..., None]) ** 2).sum(-1) / (2 * s ** 2) if len(y) else 0
        for value, count in zip(*np.unique(c, return_counts=True)):
            tail = erfc((value - mu) / (s * math.sqrt(2))).astype(float) / 2
            ll = ll + count * np.log(np.maximum(tail, 1e-300))
        return ll

    lo, hi = 0.0, float(np.log(lengths.max())) + 6
    s_lo, s_hi = (sigma, sigma) if sigma else (0.05, 3.0)
    for _ in range(4):  # grid, then three finer grids around the best point
        mu, s = np.meshgrid(np.linspace(lo, hi, 81), np.linspace(s_lo, s_hi, 1 if sigma else 81), indexing="ij")
        i, j = np.unravel_index(np.argmax(loglik(mu, s)), mu.shape)
        best_mu, best_s = float(mu[i, j]), float(s[i, j])
        dm, ds = (hi - lo) / 20, (s_hi - s_lo) / 20
        lo, hi = best_mu - dm, best_mu + dm
        if not sigma:
            s_lo, s_hi = max(0.01, best_s - ds), best_s + ds
    return best_mu, best_s


@dataclass
class Measured:
    """Per-row answer lengths of one generation output (rows x variants)."""

    variants: list[str]
    lengths: np.ndarray
    truncated: np.ndarray
    prompt: np.ndarray
    cap: int
    fits: dict = field(default_factory=dict)  # variant -> (mu, sigma, sigma fitted?)


def load_measured(out_dir: str, tail_sigma: float, min_stops: int = 20) -> Measured:
    """Lengths, truncation flags and prompt lengths of an output's committed shards, plus a tail fit each."""
    from pipeline.shards import read_manifest, read_pairs_table

    manifest = read_manifest(out_dir)
    variants = list(manifest["variants"])
    cols = ["num_prompt_tokens"] + [f"{v}__{c}" for v in variants for c in ("num_tokens", "finish_reason")]
    table = read_pairs_table(out_dir, columns=cols).to_pydict()
    lengths = np.maximum(1, np.array([table[f"{v}__num_tokens"] for v in variants]).T)
    truncated = np.array([[f == "length" for f in table[f"{v}__finish_reason"]] for v in variants]).T
    cap = int(manifest["run_config"]["sampling"]["max_tokens"])
    return _with_fits(Measured(variants, lengths, truncated, np.array(table["num_prompt_tokens"]), cap),
                      tail_sigma, min_stops)


def load_lengths(path: str, tail_sigma: float, min_stops: int = 20) -> Measured:
    """As ``load_measured``, from a JSON file of answer lengths: ``bench/bench_mixed.py --json`` writes one (its
    "lengths" block: variants, max_tokens, num_prompt_tokens per prompt, num_tokens and finish_reason per variant
    and prompt); a file holding just that block works too."""
    data = json.loads(Path(path).read_text())
    data = data.get("lengths", data)
    try:
        variants = list(data["variants"])
        lengths = np.maximum(1, np.array([data["num_tokens"][v] for v in variants]).T)
        truncated = np.array([[f == "length" for f in data["finish_reason"][v]] for v in variants]).T
        m = Measured(variants, lengths, truncated, np.array(data["num_prompt_tokens"]), int(data["max_tokens"]))
    except (KeyError, TypeError, ValueError) as err:
        raise SystemExit(f"sim_batching: error: {path} is not an answer-length file ({type(err).__name__}: {err}); "
                         "write one with bench/bench_mixed.py --json") from None
    return _with_fits(m, tail_sigma, min_stops)


def _with_fits(m: Measured, tail_sigma: float, min_stops: int) -> Measured:
    truncated, lengths = m.truncated, m.lengths
    for j, v in enumerate(m.variants):
        stops = int((~truncated[:, j]).sum())
        fixed = None if stops >= min_stops else tail_sigma
        m.fits[v] = (*fit_lognormal_censored(lengths[:, j], truncated[:, j], fixed), fixed is None)
    return m


def sample_measured(m: Measured, n: int, budget: int, tail: bool, rng: np.random.Generator):
    """n prompts resampled row-wise (keeps each prompt's variants together); truncated answers continue in the
    fitted log-normal beyond their cap (``tail``) or stay at the cap (replay)."""
    rows = rng.integers(0, len(m.lengths), n)
    lengths = m.lengths[rows].astype(float)
    if tail:
        for j, v in enumerate(m.variants):
            mu, sigma, _ = m.fits[v]
            cut = m.truncated[rows, j]
            p0 = np.array([_NORMAL.cdf((math.log(x) - mu) / sigma) for x in lengths[cut, j]])
            u = np.minimum(p0 + (1 - p0) * rng.random(len(p0)), 1 - 1e-12)
            beyond = np.exp(mu + sigma * np.array([_NORMAL.inv_cdf(x) for x in u]))
            lengths[cut, j] = np.maximum(lengths[cut, j], beyond)
    cap = budget if tail else min(budget, m.cap)
    return m.prompt[rows].astype(np.int64), np.minimum(np.ceil(lengths), cap).astype(np.int64)


def sample_synthetic(n: int, variants: int, median: float, sigma: float, rho: float, budget: int,
                     prompt_median: float, prompt_sigma: float, prompt_cap: int, rng: np.random.Generator):
    """Log-normal answers (log-lengths of one prompt's variants correlated by rho) and log-normal prompts."""
    z = rho * rng.standard_normal((n, 1)) + math.sqrt(1 - rho ** 2) * rng.standard_normal((n, variants))
    lengths = np.clip(np.ceil(median * np.exp(sigma * z)), 1, budget).astype(np.int64)
    prompt = np.clip(np.ceil(prompt_median * np.exp(prompt_sigma * rng.standard_normal(n))), 1, prompt_cap)
    return prompt.astype(np.int64), lengths


# ---------------------------------------------------------------------------------------------------
# experiment and report


@dataclass
class Scenario:
    """One answer-length source: a name for the table, what it assumes, and a sampler (rng -> prompt, lengths)."""

    name: str
    note: str
    sample: object


def experiment(engine: Engine, scenario: Scenario, prompts: int, batch_sizes: list[int], seeds: int) -> dict:
    """Every schedule and batch size on the same sampled requests per seed; per-seed figures, per batch size."""
    out = {p: [] for p in batch_sizes}
    lengths_seen = []
    for seed in range(seeds):
        prompt, lengths = scenario.sample(np.random.default_rng(seed))
        variants = lengths.shape[1]
        lengths_seen.append(lengths)
        prompt_r, length_r = np.repeat(prompt, variants), lengths.reshape(-1)
        mixed = run_schedule(engine, prompt_r, length_r, schedules(prompts, variants, prompts)["mixed"])
        for p in batch_sizes:
            calls = schedules(prompts, variants, p)
            runs = {name: run_schedule(engine, prompt_r, length_r, calls[name]) for name in ("switched", "batch-mixed")}
            out[p].append({**runs, "mixed": mixed})
    return {"per_batch": out, "lengths": np.concatenate(lengths_seen)}


def _spread(values: list[float], digits: int = 2) -> str:
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(engine: Engine, result: dict) -> str:
    """Markdown rows: per batch size P, mean over seeds (min-max)."""
    rows = ["| P | switched (t_step) | batch-mixed (t_step) | mixed (t_step) | **gain mixed / switched** | "
            "gain batch-mixed | gain, with KV reads | tokens per t_step: switched, mixed | "
            "occupancy: switched, mixed | preemptions (mixed) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p, seeds in result["per_batch"].items():
        g = lambda a, b, f="flat": [getattr(s[a], f) / getattr(s[b], f) for s in seeds]  # noqa: E731
        mean = lambda name, f="flat": np.mean([getattr(s[name], f) for s in seeds])  # noqa: E731
        rate = lambda name: np.mean([s[name].tokens / s[name].flat for s in seeds])  # noqa: E731
        occ = lambda name: np.mean([s[name].seq_steps / s[name].steps / engine.max_num_seqs for s in seeds])  # noqa: E731
        rows.append(f"| {p} | {mean('switched'):,.0f} | {mean('batch-mixed'):,.0f} | {mean('mixed'):,.0f} | "
                    f"**{_spread(g('switched', 'mixed'))}** | {_spread(g('switched', 'batch-mixed'))} | "
                    f"{_spread(g('switched', 'mixed', 'kv_read'))} | {rate('switched'):.0f}, {rate('mixed'):.0f} | "
                    f"{occ('switched'):.0%}, {occ('mixed'):.0%} | {mean('mixed', 'preemptions'):.0f} |")
    return "\n".join(rows)


def describe(lengths: np.ndarray, budget: int) -> str:
    flat = lengths.reshape(-1)
    q = np.percentile(flat, [50, 90, 99])
    return (f"answers: mean {flat.mean():.0f}, median {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f} tokens; "
            f"{(flat >= budget).mean():.1%} at the {budget}-token budget; per variant mean "
            + ", ".join(f"{x:.0f}" for x in lengths.mean(0)))


def section_text(args, engine: Engine, ref: int, headline: list[str], parts: list[str]) -> str:
    """The BENCHMARKS.md section: command, every assumption, the reading, the tables."""
    given = [a for a in sys.argv[1:] if a not in ("--write", str(args.write))]
    cmd = " ".join(["python bench/sim_batching.py"] + given)
    prefill = (f"chunked prefill within {engine.prefill_budget} tokens per step (max_num_batched_tokens)"
               if engine.prefill_budget else "prefill ignored (it takes no time; its KV is held)")
    why = (f"Why these settings: max_num_seqs {engine.max_num_seqs} and P = 256 are the batch_size and max_num_seqs "
           f"of jobs/configs/generate_llama31_8b.yaml, and B = {args.budget} is the paper's max_tokens.")
    if args.out_dir or args.lengths:
        why += (f" The measured output (`{args.out_dir or args.lengths}`) comes from a small model with a low "
                "max_tokens: replayed "
                "at its cap it shows how short answers drain, and its tail beyond the cap is an extrapolation, so it "
                "is a cross-check.")
    if args.synthetic:
        why += (f" The synthetic log-normal (median {args.median:g}, sigma {args.sigma:g}) stands for an 8B chat "
                "model's answers under the 2048-token budget (mean near the 500 tokens the Generation pipeline "
                "projection assumes) and is the headline.")
    return f"""{HEADING}

A model, not a measurement: `{cmd} --write docs/BENCHMARKS.md` (pure Python + numpy, seconds on the CPU).
It replays answer lengths through a model of one GPU running continuous batching (bench/sim_batching.py).

- engine: Llama-3.1-8B in bf16 on one 80 GB H100; max_num_seqs {engine.max_num_seqs}; a KV cache of
  {engine.kv_tokens:,} tokens (0.9 x 80 GiB - 15.0 GiB of weights - 4 GiB of activations and CUDA graphs, at
  128 KiB per token); requests admitted FIFO while a slot, KV room and the step's token budget last;
  {prefill};
  when the KV cache is full the last-admitted request is preempted and recomputed later (vLLM V1).
  Variants of one prompt share no prefix blocks (the gate salts the prefix cache per mask).
- step time, in t_step = one memory-bound decode step (one read of the 16 GB of weights), flat in batch size up
  to the compute knee: max(1, tokens in the step / {engine.knee:g}), 989 dense bf16 TFLOP/s over 3.35 TB/s.
  "With KV reads" adds the time to read the KV cache each step (KV tokens x 128 KiB / 16 GB), which a full batch
  of long answers pays and a draining one does not: the more faithful of the two. Not modelled: sampling, the
  mask switch (~1 ms measured, under one step), scheduler CPU time, decode kernels that slow down before the
  knee, and whatever a per-request gate would add to a step.
- schedules over the same sampled requests ({args.prompts} prompts per seed, seeds 0-{args.seeds - 1}; figures
  are means, brackets the min-max over seeds): **switched** = today, per actor batch of P prompts one drained
  engine call per variant; **batch-mixed** = a per-request gate with today's actor loop (one drained call per
  batch with all variants); **mixed** = all variants of all prompts in one FIFO stream, prompt-major.
  Gain = switched time / other time. The mixed stream still drains once at its very end; over the
  {args.prompts} prompts that costs a few percent of its time, so its gain is slightly understated.
- occupancy = mean requests per step / max_num_seqs; tokens per t_step = generated tokens / modelled time.

{why}

Expected gain of mixed over switched at P = {ref}, B = {args.budget}: {"; ".join(headline)}.

""" + "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="a generation output directory whose answer lengths are replayed")
    parser.add_argument("--lengths", help="instead of --out-dir: a JSON file of measured answer lengths to replay "
                                          "(bench/bench_mixed.py --json)")
    parser.add_argument("--tail", choices=["lognormal", "replay", "both"], default="both",
                        help="truncated answers: continue in a log-normal fitted with censoring, or replay at the cap")
    parser.add_argument("--tail-sigma", type=float, default=1.0,
                        help="log-normal sigma used when a variant has fewer than 20 untruncated answers")
    parser.add_argument("--synthetic", choices=["lognormal"], help="also run a synthetic answer-length distribution")
    parser.add_argument("--median", type=float, default=300, help="synthetic answers: median tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="synthetic answers: sigma of log-length")
    parser.add_argument("--rho", type=float, default=0.5, help="synthetic: correlation of one prompt's log-lengths")
    parser.add_argument("--variants", type=int, default=3, help="synthetic: variants per prompt")
    parser.add_argument("--prompt-median", type=float, default=70, help="synthetic prompts: median tokens")
    parser.add_argument("--prompt-sigma", type=float, default=1.0, help="synthetic prompts: sigma of log-length")
    parser.add_argument("--budget", type=int, default=2048, help="max_tokens B")
    parser.add_argument("--prompts", type=int, default=4096, help="prompts sampled per seed")
    parser.add_argument("--batch-sizes", default="16,64,256", help="actor batch sizes P, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-num-seqs", type=int, default=Engine.max_num_seqs)
    parser.add_argument("--kv-tokens", type=int, default=Engine.kv_tokens)
    parser.add_argument("--prefill-budget", type=int, default=Engine.prefill_budget,
                        help="max_num_batched_tokens per step; 0 = prefill takes no time")
    parser.add_argument("--knee", type=float, default=Engine.knee, help="tokens per step where compute overtakes "
                                                                        "the weight read")
    parser.add_argument("--write", type=Path, help=f"markdown file whose '{HEADING}' section is replaced")
    args = parser.parse_args()
    if not args.out_dir and not args.lengths and not args.synthetic:
        parser.error("give --out-dir or --lengths, --synthetic, or both")
    if args.out_dir and args.lengths:
        parser.error("give --out-dir or --lengths, not both")
    engine = Engine(args.max_num_seqs, args.kv_tokens, args.prefill_budget, args.knee)
    batch_sizes = [int(p) for p in args.batch_sizes.split(",")]
    B, n = args.budget, args.prompts
    scenarios = []
    measured = args.out_dir or args.lengths
    if measured:
        m = (load_measured(args.out_dir, args.tail_sigma) if args.out_dir
             else load_lengths(args.lengths, args.tail_sigma))
        share = m.truncated.mean()
        fits = "; ".join(f"{v} median {math.exp(mu):.0f}, sigma {s:.2f}{'' if fitted else ' (fixed)'}"
                         for v, (mu, s, fitted) in m.fits.items())
        src = (f"`{measured}` ({len(m.lengths)} prompts x {len(m.variants)} variants, cap {m.cap}, "
               f"{share:.0%} truncated)")
        if args.tail in ("replay", "both"):
            scenarios.append(Scenario(f"measured, replayed at the cap ({min(B, m.cap)} tokens)",
                                      f"{src}; lengths as measured, truncated ones stay at the cap",
                                      lambda rng: sample_measured(m, n, B, False, rng)))
        if args.tail in ("lognormal", "both") and B > m.cap:
            scenarios.append(Scenario(f"measured + log-normal tail to {B} tokens",
                                      f"{src}; untruncated lengths replayed, truncated ones drawn from a log-normal "
                                      f"fitted by censored maximum likelihood, conditioned on exceeding the cap "
                                      f"({fits})", lambda rng: sample_measured(m, n, B, True, rng)))
    if args.synthetic:
        scenarios.append(Scenario(
            f"synthetic log-normal, median {args.median:g}, sigma {args.sigma:g}",
            f"{args.variants} variants per prompt, the same distribution each, log-lengths of one prompt's variants "
            f"correlated {args.rho:g}; prompts log-normal median {args.prompt_median:g}, sigma {args.prompt_sigma:g}, "
            f"at most {8192 - B} tokens", lambda rng: sample_synthetic(
                n, args.variants, args.median, args.sigma, args.rho, B, args.prompt_median, args.prompt_sigma,
                8192 - B, rng)))
    parts, headline = [], []
    ref = engine.max_num_seqs if engine.max_num_seqs in batch_sizes else max(batch_sizes)
    for sc in scenarios:
        result = experiment(engine, sc, n, batch_sizes, args.seeds)
        parts.append(f"**{sc.name}**: {sc.note}. {describe(result['lengths'], B)}.\n\n{table(engine, result)}\n")
        print(parts[-1], flush=True)
        runs = result["per_batch"][ref]
        gain = [np.mean([getattr(r["switched"], f) / getattr(r["mixed"], f) for r in runs])
                for f in ("flat", "kv_read")]
        headline.append(f"{sc.name}: **{gain[0]:.1f}x** flat, **{gain[1]:.1f}x** with KV reads")
    section = section_text(args, engine, ref, headline, parts)
    if args.write:
        from bench_detect import write_section

        write_section(args.write, HEADING, section)


if __name__ == "__main__":
    main()
