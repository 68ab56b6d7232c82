"""Before/after evaluation: the synthetic long-context suite (``pipeline.eval_tasks``) on several checkpoints.

Each checkpoint gets its own gated vLLM engine (plain model, greedy), answers every sample in one batched
``generate`` call, and is closed before the next loads. The first checkpoint is the baseline. Because the
suite is seeded, every checkpoint answers the same samples, so differences are *paired*: the bootstrap
resamples sample indices within each task x length cell (stratified, so every replicate keeps the design)
and applies the same indices to all checkpoints; the spread of the replicate differences is the paired
95% interval (percentile method).

Scores: cell = mean over its samples; task = mean over its lengths; overall = mean over cells (RULER
averages tasks the same way). A general-quality guard: perplexity of the assistant turns of a held-out,
built-in chat text (``pipeline/data/eval_chat.jsonl``), from vLLM ``prompt_logprobs`` on the same engine
(no second model load, and it scales to GPU-sized checkpoints).

Outputs in ``out_dir``: ``results.json`` (config, scores, intervals, paired differences, perplexity,
per-sample outputs), ``results.md``, ``samples.jsonl`` (the prompts), ``scores_by_length.png``,
``overall.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.engine import EngineConfig
from pipeline.eval_tasks import DEFAULT_LENGTHS, SAMPLES_PER_CELL, TASKS, EvalSample, build_suite
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to evaluate and how; ``models`` maps a display name to an alias/path, the first is the baseline."""

    models: dict[str, str] = field(default_factory=lambda: {"base": EMBEDDED_ALIAS}, metadata={"help": "name -> alias, checkpoint dir or hub id; first = baseline"})
    tasks: tuple[str, ...] = field(default=tuple(TASKS), metadata={"help": "eval task names (pipeline.eval_tasks.TASKS)"})
    lengths: tuple[int, ...] = field(default=DEFAULT_LENGTHS, metadata={"help": "prompt lengths in tokens of the baseline's tokenizer"})
    samples_per_cell: int = field(default=SAMPLES_PER_CELL, metadata={"help": "samples per task x length (see eval_tasks for why 20)"})
    seed: int = field(default=0, metadata={"help": "suite seed: same seed, same samples"})
    max_tokens: int | None = field(default=None, metadata={"help": "answer budget for every task; None = each task's own (32-64)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap replicates for the 95% intervals"})
    perplexity: bool = field(default=True, metadata={"help": "held-out chat perplexity as a general-quality guard"})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "engine template; model and max_model_len are set per checkpoint"})

    @classmethod
    def demo(cls, models: dict[str, str], **overrides) -> "EvalConfig":
        """CPU-sized: every task once per 1K cell x 3 samples (21 per checkpoint). Shows the machinery and
        large effects only: its paired 95% half-width is ~20 points, not the default suite's <= 5."""
        return cls(models=models, **{"lengths": (1000,), "samples_per_cell": 3, "bootstrap": 1000, **overrides})


# --- statistics (pure) ---

def cell_groups(samples: list[EvalSample]) -> tuple[list[tuple[str, int]], np.ndarray]:
    """The (task, length) cells in suite order and each sample's cell index."""
    cells = list(dict.fromkeys((s.task, s.length) for s in samples))
    where = {c: i for i, c in enumerate(cells)}
    return cells, np.array([where[(s.task, s.length)] for s in samples])


def bootstrap_cell_means(scores: np.ndarray, groups: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """Replicates of every cell's mean, shape (num, checkpoints, cells), from a stratified resample.

    ``scores`` is (checkpoints, samples); one set of resampled indices serves every checkpoint, which is
    what makes differences of replicates paired.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((num, scores.shape[0], int(groups.max()) + 1))
    for g in range(out.shape[2]):
        members = np.flatnonzero(groups == g)
        draw = members[rng.integers(0, len(members), size=(num, len(members)))]
        out[:, :, g] = scores[:, draw].mean(axis=-1).T
    return out


def interval(replicates: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap replicates (along axis 0)."""
    lo, hi = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return [float(lo), float(hi)]


def summarize(scores: np.ndarray, names: list[str], cells: list[tuple[str, int]], groups: np.ndarray,
              num: int = 2000, seed: int = 0) -> dict:
    """Per checkpoint: cells, tasks and overall with 95% intervals; per non-baseline: paired differences."""
    cell_means = np.stack([scores[:, groups == g].mean(axis=1) for g in range(len(cells))], axis=1)  # (k, G)
    reps = bootstrap_cell_means(scores, groups, num, seed)  # (B, k, G)
    tasks = list(dict.fromkeys(t for t, _ in cells))
    columns = {t: [g for g, (task, _) in enumerate(cells) if task == t] for t in tasks}

    def stat(values: np.ndarray, replicates: np.ndarray) -> dict:
        return {"mean": float(values), "ci": interval(replicates)}

    out: dict = {"checkpoints": {}, "paired": {}}
    for k, name in enumerate(names):
        out["checkpoints"][name] = {
            "overall": stat(cell_means[k].mean(), reps[:, k].mean(axis=1)),
            "tasks": {t: {**stat(cell_means[k, c].mean(), reps[:, k, c].mean(axis=1)),
                          "by_length": {str(cells[g][1]): {**stat(cell_means[k, g], reps[:, k, g]), "n": int((groups == g).sum())}
                                        for g in c}}
                      for t, c in columns.items()},
        }
    for k, name in enumerate(names[1:], start=1):
        diff, rdiff = cell_means[k] - cell_means[0], reps[:, k] - reps[:, 0]
        flips = (scores[k] != scores[0]).mean()
        out["paired"][name] = {
            "vs": names[0],
            "overall": stat(diff.mean(), rdiff.mean(axis=1)),
            "tasks": {t: stat(diff[c].mean(), rdiff[:, c].mean(axis=1)) for t, c in columns.items()},
            "share_changed": float(flips),  # the q of the sample-size reasoning in eval_tasks
        }
    return out


# --- running ---

def evaluate(config: EvalConfig, out_dir: str | Path) -> dict:
    """Run the suite on every checkpoint in ``config.models``; write and return the results."""
    from transformers import AutoTokenizer

    from retrieval_heads.models import model_shape, resolve_model

    if not config.models:
        raise RetmaskError("no models to evaluate; pass at least one name=path")
    paths = {name: resolve_model(model) for name, model in config.models.items()}
    names = list(paths)
    context = min(model_shape(p).max_position_embeddings or 10**9 for p in paths.values())
    # The suite is built (and its lengths measured) with the baseline's tokenizer and chat template.
    tokenizer = AutoTokenizer.from_pretrained(paths[names[0]])
    samples = build_suite(tokenizer, tuple(config.tasks), tuple(config.lengths), config.samples_per_cell, config.seed,
                          context, config.engine.chat_template_kwargs, config.max_tokens)
    # Room for the longest request (and for the perplexity dialogues, a few hundred tokens each).
    max_model_len = min(max(1024, max(s.num_tokens + s.max_tokens for s in samples)), context)
    log.info("eval suite: %d samples (%d tasks x %d lengths x %d), max_model_len %d", len(samples), len(config.tasks),
             len(config.lengths), config.samples_per_cell, max_model_len)

    dtype = common_dtype(list(paths.values())) if config.engine.dtype == "auto" else config.engine.dtype
    log.info("every checkpoint runs in %s", dtype)
    runs = {name: _run_checkpoint(config, path, samples, max_model_len, dtype) for name, path in paths.items()}
    scores = np.array([[TASKS[s.task].score(c.text, s.answers) for s, c in zip(samples, runs[n]["completions"])] for n in names])
    cells, groups = cell_groups(samples)
    results = {
        "config": _jsonable(dataclasses.asdict(config)),
        "models": {n: {"path": paths[n], **_model_id(paths[n])} for n in names},
        "suite": {"num_samples": len(samples), "tasks": list(config.tasks), "lengths": list(config.lengths),
                  "samples_per_cell": config.samples_per_cell, "seed": config.seed},
        **summarize(scores, names, cells, groups, config.bootstrap, config.seed),
        "dtype": dtype,
        "perplexity": {n: runs[n]["perplexity"] for n in names},
        "timing": {n: runs[n]["timing"] for n in names},
        "samples": [_sample_record(s, {n: (runs[n]["completions"][i], scores[k, i]) for k, n in enumerate(names)})
                    for i, s in enumerate(samples)],
    }
    from pipeline.provenance import package_versions

    results["packages"] = package_versions()
    _write(results, samples, Path(out_dir))
    return results


def common_dtype(paths: list[str]) -> str:
    """One dtype for every checkpoint: float32 if any is stored in float32, else the baseline's.

    Comparing a bf16 baseline with a float32 trained checkpoint in their own dtypes would mix the
    training effect with precision; casting the trained one to bf16 would round away small updates
    (a 1e-5 step is below bf16's resolution of most weights).
    """
    from transformers import AutoConfig

    from pipeline.engine import checkpoint_dtype

    names = [checkpoint_dtype(AutoConfig.from_pretrained(path)) for path in paths]
    return "float32" if "float32" in names else names[0]


def _run_checkpoint(config: EvalConfig, path: str, samples: list[EvalSample], max_model_len: int, dtype: str) -> dict:
    from vllm import SamplingParams

    from pipeline.engine import GatedLLM

    dialogues = builtin_chat() if config.perplexity else []
    engine = dataclasses.replace(config.engine, model=path, max_model_len=max_model_len, dtype=dtype)
    t0 = time.perf_counter()
    llm = GatedLLM.from_config(engine)
    try:
        t1 = time.perf_counter()
        sampling = [SamplingParams(temperature=0.0, max_tokens=s.max_tokens) for s in samples]
        completions = llm.generate([s.prompt for s in samples], sampling, mask=None, progress=True)
        t2 = time.perf_counter()
        perplexity = chat_perplexity(llm, dialogues) if dialogues else None
    finally:
        llm.close()  # free the engine's memory before the next checkpoint loads
    mismatched = sum(c.num_prompt_tokens != s.num_tokens for s, c in zip(samples, completions))
    if mismatched:  # another tokenizer or chat template than the baseline's: lengths are approximate
        log.warning("%s: %d of %d prompts tokenized to another length than the suite measured", path, mismatched, len(samples))
    timing = {"load_s": t1 - t0, "generate_s": t2 - t1, "samples_per_s": len(samples) / (t2 - t1),
              "prompt_tokens": sum(c.num_prompt_tokens for c in completions), "length_mismatches": mismatched}
    return {"completions": completions, "perplexity": perplexity, "timing": timing}


def builtin_chat() -> list[list[dict]]:
    """The held-out chat dialogues shipped in ``pipeline/data/eval_chat.jsonl``."""
    text = resources.files("pipeline").joinpath("data/eval_chat.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["messages"] for line in text.splitlines() if line.strip()]


def chat_perplexity(llm, dialogues: list[list[dict]]) -> dict:
    """Token-weighted perplexity of the assistant turns (what DPO changes), from vLLM prompt logprobs."""
    from vllm import SamplingParams

    tokenizer, kwargs = llm.llm.get_tokenizer(), llm.config.chat_template_kwargs

    def render(messages, generation_prompt=False):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
        return tokenizer.encode(text, add_special_tokens=False)

    inputs, spans, assistant_only = [], [], True
    for messages in dialogues:
        ids, turns = render(messages), []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                before, through = render(messages[:i], True), render(messages[: i + 1])
                turns.append((len(before), len(through)))
                # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property.
                assistant_only &= ids[: len(before)] == before and ids[: len(through)] == through
        inputs.append(ids)
        spans.append(turns)
    llm.set_mask(None)
    outputs = llm.llm.generate([{"prompt_token_ids": ids} for ids in inputs], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll, count = 0.0, 0
    for ids, turns, out in zip(inputs, spans, outputs):
        positions = [j for a, b in turns for j in range(max(a, 1), b)] if assistant_only else range(1, len(ids))
        for j in positions:
            nll -= out.prompt_logprobs[j][ids[j]].logprob
            count += 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "scored": "assistant turns" if assistant_only else "all tokens",
            "dialogues": len(dialogues)}


# --- writing ---

def _sample_record(s: EvalSample, outputs: dict) -> dict:
    return {"id": s.id, "task": s.task, "length": s.length, "num_tokens": s.num_tokens, "depths": list(s.depths),
            "answers": list(s.answers), "max_tokens": s.max_tokens,
            "outputs": {n: {"text": c.text, "score": float(score), "finish_reason": c.finish_reason} for n, (c, score) in outputs.items()}}


def _model_id(path: str) -> dict:
    from pipeline.provenance import hash_model_dir

    return {"content_id": hash_model_dir(path)} if Path(path).is_dir() else {}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write(results: dict, samples: list[EvalSample], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(dataclasses.asdict(s)) + "\n")
    plot_scores_by_length(results, out / "scores_by_length.png")
    plot_overall(results, out / "overall.png")
    (out / "results.md").write_text(markdown(results))


# --- report: results.md and the PNGs, from the results dict ---

def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(stat: dict, signed: bool = False) -> str:
    lo, hi = stat["ci"]
    mean = f"{100 * stat['mean']:+.1f}" if signed else _pts(stat["mean"])
    return f"{mean} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(results: dict) -> str:
    """Task x length table per checkpoint, overall with 95% CI, paired differences, perplexity."""
    names = list(results["checkpoints"])
    suite = results["suite"]
    lines = [
        "# Long-context evaluation",
        "",
        f"{suite['num_samples']} samples per checkpoint: {len(suite['tasks'])} tasks x {len(suite['lengths'])} lengths x "
        f"{suite['samples_per_cell']} (seed {suite['seed']}), greedy decoding. Scores in points (0-100, string-match "
        "recall); brackets: 95% bootstrap intervals. Baseline: " + names[0] + f". Every checkpoint runs in {results.get('dtype', 'its own dtype')}.",
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
        lines.append(f"| **{task}** | all | " + " | ".join(f"**{_pts(results['checkpoints'][n]['tasks'][task]['mean'])}**" for n in names) + " |")
    lines += ["", "## Overall", "", "| model | overall | chat perplexity |", "|---|---|---|"]
    for n in names:
        ppl = results["perplexity"].get(n)
        lines.append(f"| {n} | {_ci(results['checkpoints'][n]['overall'])} | {ppl['perplexity']:.3f} |" if ppl
                     else f"| {n} | {_ci(results['checkpoints'][n]['overall'])} | - |")
    if results["paired"]:
        lines += ["", f"## Paired differences vs {names[0]} (same samples)", "",
                  "| model | overall | share of samples changed | " + " | ".join(first) + " |",
                  "|---|---|---|" + "---|" * len(first)]
        for n, p in results["paired"].items():
            lines.append(f"| {n} | {_ci(p['overall'], True)} | {100 * p['share_changed']:.0f}% | "
                         + " | ".join(_ci(p["tasks"][t], True) for t in first) + " |")
    ppl = next((p for p in results["perplexity"].values() if p), None)
    if ppl:
        lines += ["", f"Chat perplexity: {ppl['scored']} of {ppl['dialogues']} held-out dialogues ({ppl['tokens']} tokens); "
                  "a rise means the fine-tune hurt general chat quality."]
    return "\n".join(lines) + "\n"


def plot_scores_by_length(results: dict, path: Path) -> Path:
    """One panel per task: score vs length, one line (with 95% band) per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["checkpoints"])
    tasks = list(results["checkpoints"][names[0]]["tasks"])
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for n in names:
            by_length = results["checkpoints"][n]["tasks"][task]["by_length"]
            xs = [int(x) for x in by_length]
            ys = [100 * v["mean"] for v in by_length.values()]
            ax.plot(xs, ys, marker="o", label=n)
            ax.fill_between(xs, [100 * v["ci"][0] for v in by_length.values()], [100 * v["ci"][1] for v in by_length.values()], alpha=0.15)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
