"""Wu et al.'s retrieval score by NIAH decoding, without ever materializing T x T attention.

Each trial: prefill all prompt tokens but the last with SDPA, then decode greedily one token at a
time; a registered attention function keeps each head's softmax row for the single decode query,
which is its attention over the whole sequence (over its window in a sliding-window layer). The row at
the position that *predicts* generated token t is the one scored for t, so
every generated token (the first one too) is scored. A head scores +1/|answer span| for each step
whose top-1 position (first position on ties, as ``torch.argmax``) lies inside the answer span and
holds the generated token. Decoding stops at EOS. A trial counts only if ROUGE-1 recall of the answer
against the needle's answer is > 0.5; per-head score = mean over counted trials.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from retrieval_heads.config import opt
from retrieval_heads.errors import RetmaskError
from retrieval_heads.masking import decoder_layers
from retrieval_heads.models import EMBEDDED_ALIAS, resolve_model, shape_of
from retrieval_heads.niah import (
    NIAH_CHAT_TEMPLATE_KWARGS,
    NIAHGrid,
    NIAHPrompt,
    build_prompt,
    builtin_needles,
    check_fits,
)
from retrieval_heads.preflight import preflight
from retrieval_heads.scores import HeadScores

log = logging.getLogger(__name__)


@dataclass
class DetectConfig:
    """Settings of a detection run (written next to its outputs); ``jobs/configs/detect.yaml`` maps 1:1."""

    model: str = opt(EMBEDDED_ALIAS, "alias, local checkpoint or hub id")
    lengths: tuple[int, ...] = opt((500, 1000, 2000, 4000), "context lengths in tokens")
    depths: tuple[float, ...] = opt((0.0, 0.25, 0.5, 0.75, 1.0), "needle depths, 0 = start, 1 = end")
    num_needles: int = opt(3, "number of built-in needles per length x depth")
    max_new_tokens: int = opt(50, "tokens decoded per trial (Wu et al. decode at most 50)")
    rouge_threshold: float = opt(0.5, "a trial counts if ROUGE-1 recall of the answer exceeds this")
    # fp32 scoring avoids bf16 ties for the top position (about 1.6% of rows on SmolLM2), which move
    # whole copy events; bf16 is for large models on GPU.
    dtype: str = opt("float32", "float32 (exact ties) or bfloat16 (large models on GPU)")
    device: str = opt("cpu", "torch device of each worker: cpu or cuda")
    chat_template_kwargs: dict = opt(
        dict(NIAH_CHAT_TEMPLATE_KWARGS), "passed to the chat template; default thinking off, as RetMask detects"
    )
    workers: int = opt(1, "trials fan out over this many Ray workers, one model copy each (1: in this process)")
    gpus_per_worker: float = opt(0.0, "GPUs per Ray worker (workers > 1)")
    cpus_per_worker: float = opt(1.0, "CPUs per Ray worker (workers > 1)")

    @property
    def grid(self) -> NIAHGrid:
        return NIAHGrid(tuple(self.lengths), tuple(self.depths), self.num_needles)


@dataclass
class TrialRecord:
    """Everything needed to recheck one trial's scores with another implementation."""

    length: int
    depth: float
    needle: int
    prompt_ids: list[int]
    answer_span: tuple[int, int]
    generated_ids: list[int]
    response: str
    rouge1_recall: float
    counted: bool
    head_scores: dict[str, float] = field(default_factory=dict)  # nonzero "layer-head" -> score
    seconds: float = 0.0


def load_model(model: str, dtype: str = "float32", device: str = "cpu"):
    """Model (SDPA attention, eval mode) and tokenizer for detection."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return net.to(device).eval(), tokenizer


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out


def top_positions(attention):
    """Top-1 attended position of each row; ties go to the first position (``torch.argmax``)."""
    return attention.argmax(dim=-1)


def copy_scores(top, token: int, prompt_ids, span: tuple[int, int]):
    """Copy events of one decode step: (layers, heads) tensor of 1/|span| where a head copied ``token``.

    ``top`` is (layers, heads): each head's top-1 position over the whole sequence for the query that
    predicted ``token`` (a top position among generated tokens is never a copy from the needle).
    """
    import torch

    start, end = span
    in_span = (top >= start) & (top < end)
    ids = torch.as_tensor(prompt_ids, device=top.device)
    same = ids[top.clamp(max=len(prompt_ids) - 1)] == token
    return (in_span & same).to(torch.float64) / (end - start)


ROW_ATTENTION = "retmask_rows"


def _row_capturing_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA for the output; for a single decode query, also keep each head's softmax row.

    The row is computed from the cached keys as softmax(q k^T * scaling) in fp32 (one row per head,
    GQA-grouped without copying K), so scoring a step costs O(T) instead of eager attention's
    ``repeat_kv`` copies, and no T x T matrix exists at any point.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    sink = getattr(module, "_retmask_rows", None)
    if sink is not None and query.shape[2] == 1:
        b, kv_heads, t, d = key.shape
        q = query.reshape(b, kv_heads, -1, d)  # (b, kv, group, d): query heads grouped by their KV head
        logits = (q.float() @ key.float().transpose(-1, -2)).reshape(b, -1, t) * (scaling or d**-0.5)
        window = getattr(module, "sliding_window", None)
        if window:  # sliding-window layers see only the last `window` keys
            logits[..., : max(0, t - window)] = float("-inf")
        # Counted back from the newest key: a sliding-window layer's cache holds only the last keys (transformers'
        # DynamicSlidingWindowLayer keeps window - 1 of them), so index i is not absolute position i there.
        sink[module.layer_idx] = top_positions(logits.softmax(-1)[0]) - t  # argmax of probabilities, as eager
    return out, None


def _register_row_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROW_ATTENTION, _row_capturing_attention)
    if ROW_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)


def greedy_decode_scored(model, prompt: NIAHPrompt, max_new_tokens: int, stop: set[int]):
    """Greedy decode; returns (generated ids, per-head score tensor (layers, heads))."""
    import torch

    shape = shape_of(model.config)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.input_ids], device=device)
    totals = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64, device=device)
    generated: list[int] = []
    rows: dict[int, torch.Tensor] = {}  # layer -> each head's top-1 position at this step
    attention = [layer.self_attn for layer in decoder_layers(model)]
    _register_row_attention()
    previous = model.config._attn_implementation
    for module in attention:
        module._retmask_rows = rows
    try:
        with torch.inference_mode():
            # prefill all but the last prompt token with the model's own kernel (a custom attention name
            # would make transformers build an explicit T x T mask); the last token is decoded, so its
            # row scores the first generated token; no prefill logits are needed (logits_to_keep=1 skips
            # a T x vocab lm_head product)
            cache = model(ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
            model.set_attn_implementation(ROW_ATTENTION)
            step_input = ids[:, -1:]
            for _ in range(max_new_tokens):
                out = model(step_input, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                if token in stop:
                    break
                keys = len(prompt.input_ids) + len(generated)  # positions this step attended over
                generated.append(token)
                top = torch.stack([rows[i] for i in range(shape.num_layers)]) + keys  # absolute positions
                totals += copy_scores(top, token, prompt.input_ids, prompt.answer_span)
                step_input = torch.tensor([[token]], device=device)
    finally:
        for module in attention:
            module._retmask_rows = None
        model.set_attn_implementation(previous)
    return generated, totals


def reference_scores(model, prompt_ids: list[int], generated: list[int], span: tuple[int, int]):
    """Straightforward reference: one eager forward over prompt + answer with full T x T attention.

    Teacher-forces ``generated`` and scores the row predicting each token. Each layer's T x T
    matrix is reduced to the needed rows as soon as the layer returns it, so peak memory is one
    layer's attention rather than all of them. Used to check ``greedy_decode_scored`` and in bench/.
    """
    import torch

    shape = shape_of(model.config)
    totals = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64)
    if not generated:
        return totals
    first = len(prompt_ids) - 1
    kept: dict[int, torch.Tensor] = {}
    attention_modules = [layer.self_attn for layer in decoder_layers(model)]

    def keep_rows(index):
        def hook(module, args, output):
            kept[index] = top_positions(output[1][0, :, first : first + len(generated), :])
            return (output[0], None)

        return hook

    handles = [m.register_forward_hook(keep_rows(i)) for i, m in enumerate(attention_modules)]
    ids = torch.tensor([prompt_ids + generated[:-1]], device=next(model.parameters()).device)
    try:
        model.set_attn_implementation("eager")
        with torch.inference_mode():
            model(ids)
    finally:
        model.set_attn_implementation("sdpa")
        for handle in handles:
            handle.remove()
    for i, token in enumerate(generated):
        top = torch.stack([kept[layer][:, i] for layer in range(shape.num_layers)])
        totals += copy_scores(top, token, prompt_ids, span).cpu()
    return totals


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(response: str, answer: str) -> float:
    """ROUGE-1 recall of the response against the needle's answer (Wu et al.'s filter)."""
    return _rouge().score(answer, response)["rouge1"].recall


def run_trial(model, tokenizer, config: DetectConfig, length: int, depth: float, needle_index: int) -> TrialRecord:
    """Build one NIAH prompt, decode it and score every head."""
    needles = builtin_needles()
    if not 0 <= needle_index < len(needles):
        raise RetmaskError(f"needle {needle_index} does not exist; the package ships {len(needles)} needles")
    start = time.perf_counter()
    prompt = build_prompt(
        tokenizer, needles[needle_index], length, depth, chat_template_kwargs=config.chat_template_kwargs
    )
    check_fits(len(prompt.input_ids), config.max_new_tokens, shape_of(model.config).max_position_embeddings)
    generated, totals = greedy_decode_scored(model, prompt, config.max_new_tokens, eos_ids(model, tokenizer))
    response = tokenizer.decode(generated, skip_special_tokens=True)
    recall = rouge1_recall(response, prompt.needle.answer)
    nonzero = {
        f"{l}-{h}": float(totals[l, h]) for l, h in zip(*totals.nonzero(as_tuple=True)) for l, h in [(int(l), int(h))]
    }
    return TrialRecord(
        length=length,
        depth=depth,
        needle=needle_index,
        prompt_ids=prompt.input_ids,
        answer_span=prompt.answer_span,
        generated_ids=generated,
        response=response,
        rouge1_recall=recall,
        counted=recall > config.rouge_threshold,
        head_scores=nonzero,
        seconds=time.perf_counter() - start,
    )


def merge_trials(records: list[TrialRecord], num_layers: int, num_heads: int) -> HeadScores:
    """Per-head lists over counted trials (failed trials add nothing), in Wu's format."""
    counted = [r for r in records if r.counted]
    trials = {
        (l, h): [r.head_scores.get(f"{l}-{h}", 0.0) for r in counted]
        for l in range(num_layers)
        for h in range(num_heads)
    }
    return HeadScores(trials)


def validate(config: DetectConfig, max_context: int) -> None:
    """Fail fast on a grid the model cannot run."""
    if not config.lengths or not config.depths or config.num_needles < 1:
        raise RetmaskError("detection grid is empty: give at least one length, one depth and one needle")
    if config.num_needles > len(builtin_needles()):
        raise RetmaskError(f"--needles {config.num_needles} is more than the {len(builtin_needles())} built-in needles")
    # a prompt is the context plus ~60 tokens of template and question
    check_fits(max(config.lengths) + 64, config.max_new_tokens, max_context)


def run_trials(config: DetectConfig, trials: list[tuple[int, float, int]] | None = None, progress: bool = True):
    """Run trials (default: the whole grid) on one device; returns (records, model shape).

    Trials are independent, so ``jobs/detect.py`` fans chunks of them out as Ray tasks.
    """
    from tqdm import tqdm

    model, tokenizer = load_model(config.model, config.dtype, config.device)
    shape = shape_of(model.config)
    validate(config, shape.max_position_embeddings)
    todo = trials if trials is not None else config.grid.trials()
    records = [
        run_trial(model, tokenizer, config, l, d, n)
        for l, d, n in tqdm(todo, desc="detect", unit="trial", disable=not progress)
    ]
    return records, shape


def detect(config: DetectConfig, out_dir: str | Path) -> HeadScores:
    """Run the grid in this process and write scores, per-trial records and a summary to ``out_dir``."""
    records, shape = run_trials(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_outputs(config, records, shape.num_layers, shape.num_heads, out)


def write_outputs(
    config: DetectConfig, records: list[TrialRecord], num_layers: int, num_heads: int, out: Path
) -> HeadScores:
    """head_scores.json (Wu format), trials.jsonl, summary.json, config.json and the heatmap."""
    scores = merge_trials(records, num_layers, num_heads)
    if not any(r.counted for r in records):
        raise RetmaskError(
            f"no trial passed the ROUGE-1 recall > {config.rouge_threshold} filter ({len(records)} run); "
            "the model cannot answer these NIAH prompts: try shorter lengths or a stronger model"
        )
    scores.save(out / "head_scores.json")
    with open(out / "trials.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    ranked = scores.ranked()
    summary = {
        "model": config.model,
        "trials_run": len(records),
        "trials_counted": sum(r.counted for r in records),
        "niah_accuracy": sum(r.counted for r in records) / len(records),
        "sparsity": scores.sparsity(),
        "preflight": preflight(scores),
        "top_heads": [
            {"head": f"{l}-{h}", "score": s, "counted_trials": len(scores.trials[(l, h)])} for (l, h), s in ranked[:20]
        ],
        "seconds": sum(r.seconds for r in records),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    from retrieval_heads.plots import plot_head_heatmap

    plot_head_heatmap(scores, num_layers, num_heads, out / "head_scores.png", title=f"Retrieval scores: {config.model}")
    return scores
