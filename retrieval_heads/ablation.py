"""Causality check: NIAH accuracy with the top-K retrieval heads masked vs K random heads.

Uses the same mask semantics that generates the training data (output zeroed at every position),
not Wu et al.'s decode-only query zeroing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from retrieval_heads.config import opt
from retrieval_heads.detect import eos_ids, load_model, rouge1_recall
from retrieval_heads.masking import HeadMask, masked, select_mask
from retrieval_heads.models import EMBEDDED_ALIAS, shape_of
from retrieval_heads.niah import NIAHGrid, NIAHPrompt, build_prompt, builtin_needles, check_fits
from retrieval_heads.scores import HeadScores


@dataclass
class AblationConfig:
    """Settings of an ablation check (written next to its outputs); ``jobs/configs/ablate.yaml`` maps 1:1."""

    model: str = opt(EMBEDDED_ALIAS, "alias, local checkpoint or hub id")
    scores: str = opt("runs/detect/head_scores.json", "head score file (Wu JSON) detected on this model")
    k: int = opt(5, "heads masked per condition: the top-k retrieval heads, or k random non-retrieval heads")
    seeds: tuple[int, ...] = opt((0, 1, 2), "seeds of the random-head controls (one condition each)")
    lengths: tuple[int, ...] = opt((1000, 2000), "context lengths in tokens")
    depths: tuple[float, ...] = opt((0.1, 0.3, 0.5, 0.7, 0.9), "needle depths, 0 = start, 1 = end")
    num_needles: int = opt(2, "number of built-in needles per length x depth")
    max_new_tokens: int = opt(32, "tokens decoded per prompt")
    batch_size: int = opt(8, "prompts decoded together (left-padded): a decode step costs about the same for 1 or 8")
    rouge_threshold: float = opt(0.5, "a prompt is answered if ROUGE-1 recall of the answer exceeds this")
    dtype: str = opt("float32", "float32 or bfloat16 (the checkpoint's dtype: faster prefill on CPU)")
    device: str = opt("cpu", "torch device: cpu or cuda")


def conditions(scores: HeadScores, shape, config: AblationConfig) -> dict[str, HeadMask]:
    """none, top-K retrieval heads, and K random non-retrieval heads per seed."""
    top = select_mask(scores, "top_k", shape, k=config.k)
    out = {"none": HeadMask.for_shape([], shape), f"retrieval_top{config.k}": top}
    for seed in config.seeds:
        out[f"random{config.k}_seed{seed}"] = select_mask(
            scores, "random_nonretrieval", shape, k=config.k, seed=seed, exclude=list(top.heads)
        )
    return out


def grid_prompts(tokenizer, grid: NIAHGrid, config: AblationConfig, max_context: int) -> list[NIAHPrompt]:
    """The grid's NIAH prompts, built once and shared by every condition."""
    needles = builtin_needles()
    prompts = [build_prompt(tokenizer, needles[n], length, depth) for length, depth, n in grid.trials()]
    for prompt in prompts:
        check_fits(len(prompt.input_ids), config.max_new_tokens, max_context)
    return prompts


def niah_accuracy(
    model, tokenizer, mask: HeadMask, prompts: list[NIAHPrompt], config: AblationConfig
) -> tuple[float, list[dict]]:
    """Share of prompts answered (ROUGE-1 recall > threshold) with ``mask`` applied.

    Greedy, in left-padded batches of ``config.batch_size`` prompts of similar length; rows come back in
    the order of ``prompts``.
    """
    import torch

    stop = list(eos_ids(model, tokenizer))
    needles = builtin_needles()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    responses: dict[int, str] = {}
    with masked(model, mask), torch.inference_mode():
        size = max(1, config.batch_size)
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            width = max(len(prompts[i].input_ids) for i in batch)
            ids = torch.full((len(batch), width), stop[0], dtype=torch.long)
            attention = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                n = len(prompts[i].input_ids)
                ids[row, width - n :] = torch.tensor(prompts[i].input_ids)
                attention[row, width - n :] = 1
            out = model.generate(
                ids.to(model.device),
                attention_mask=attention.to(model.device),
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=stop[0],
            )
            for row, i in enumerate(batch):
                responses[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    rows = []
    for i, prompt in enumerate(prompts):
        recall = rouge1_recall(responses[i], prompt.needle.answer)
        rows.append(
            {
                "length": prompt.length,
                "depth": prompt.depth,
                "needle": needles.index(prompt.needle),
                "recall": recall,
                "response": responses[i],
            }
        )
    accuracy = sum(r["recall"] > config.rouge_threshold for r in rows) / len(rows)
    return accuracy, rows


def run_ablation(config: AblationConfig, out_dir: str | Path) -> list[dict]:
    """Run every condition, write ablation.json, ablation.md and ablation.png; return the table rows."""
    from tqdm import tqdm

    from retrieval_heads.plots import plot_ablation

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = HeadScores.load(config.scores)  # fail on a bad score file before loading the model
    model, tokenizer = load_model(config.model, config.dtype, config.device)
    shape = shape_of(model.config)
    scores.check_shape(shape)
    grid = NIAHGrid(tuple(config.lengths), tuple(config.depths), config.num_needles)
    prompts = grid_prompts(tokenizer, grid, config, shape.max_position_embeddings)
    table, details = [], {}
    for name, mask in tqdm(conditions(scores, shape, config).items(), desc="ablate", unit="condition"):
        accuracy, rows = niah_accuracy(model, tokenizer, mask, prompts, config)
        n = len(rows)
        table.append(
            {
                "condition": name,
                "heads": mask.spec(),
                "accuracy": accuracy,
                "stderr": math.sqrt(accuracy * (1 - accuracy) / n),
                "n": n,
            }
        )
        details[name] = rows
    randoms = [r["accuracy"] for r in table if r["condition"].startswith("random")]
    if randoms:
        mean = sum(randoms) / len(randoms)
        table.append(
            {
                "condition": f"random{config.k}_mean",
                "heads": "",
                "accuracy": mean,
                "stderr": math.sqrt(mean * (1 - mean) / (len(randoms) * len(rows))),
                "n": len(randoms) * len(rows),
            }
        )
    (out / "ablation.json").write_text(
        json.dumps({"config": asdict(config), "table": table, "trials": details}, indent=2) + "\n"
    )
    lines = ["| condition | heads masked | NIAH accuracy | n |", "|---|---|---|---|"]
    lines += [
        f"| {r['condition']} | {r['heads'] or '-'} | {r['accuracy']:.2f} ± {r['stderr']:.2f} | {r['n']} |"
        for r in table
    ]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    plot_ablation(table, out / "ablation.png", title=f"NIAH accuracy, {config.model}, lengths {list(config.lengths)}")
    return table
