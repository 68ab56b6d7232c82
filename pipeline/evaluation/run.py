"""Engine runs: every checkpoint answers the suite in its own gated vLLM engine, one after the other.

Each checkpoint gets a plain engine (no mask, greedy), answers every sample in one batched ``generate``
call, and is closed before the next loads. Its answers are kept under ``answers/`` with what produced them,
so an interrupted run resumes after its last finished checkpoint (the study's three take hours on a CPU).
All run in one dtype (``common_dtype``). A general-quality guard rides on the same engine: perplexity of
the assistant turns of a held-out, built-in chat text (``pipeline/data/eval_chat.jsonl``) from vLLM
``prompt_logprobs`` (no second model load, and it scales to GPU-sized checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.engine import Completion
from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.fitting import EvalSample, build_suite, format_cell, parse_cells
from pipeline.evaluation.statistics import cell_groups, summarize
from pipeline.evaluation.tasks import get_task
from retrieval_heads.errors import RetmaskError
from retrieval_heads.files import write_text_atomically
from retrieval_heads.models import render_chat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    """The checkpoints and the suite they all answer, sized before any engine loads."""

    paths: dict[str, str]  # display name -> local checkpoint or hub id; the first is the baseline
    samples: list[EvalSample]
    max_model_len: int
    dtype: str


def build_plan(config: EvalConfig) -> EvalPlan:
    """Resolve the checkpoints and build the suite with the baseline's tokenizer and chat template."""
    from transformers import AutoTokenizer

    from retrieval_heads.models import model_shape, resolve_model

    if not config.models:
        raise RetmaskError("no models to evaluate; pass at least one name=path")
    if config.cells is not None:  # a bad cell or misspelt task is refused before any model is fetched
        parse_cells(config.cells)
    else:
        for name in config.tasks:
            get_task(name)
    paths = {name: resolve_model(model) for name, model in config.models.items()}
    context = min(model_shape(p).max_position_embeddings or 10**9 for p in paths.values())
    tokenizer = AutoTokenizer.from_pretrained(next(iter(paths.values())))
    samples = build_suite(tokenizer, tuple(config.tasks), tuple(config.lengths), config.samples_per_cell,
                          config.seed, context, config.engine.chat_template_kwargs, config.max_tokens, config.cells)
    # Room for the longest request (and for the perplexity dialogues, a few hundred tokens each).
    max_model_len = min(max(1024, max(s.num_tokens + s.max_tokens for s in samples)), context)
    shape = (f"{len(config.tasks)} tasks x {len(config.lengths)} lengths" if config.cells is None
             else f"{len(config.cells)} cells")
    log.info("eval suite: %d samples (%s x %d), max_model_len %d", len(samples), shape, config.samples_per_cell,
             max_model_len)
    dtype = common_dtype(list(paths.values())) if config.engine.dtype == "auto" else config.engine.dtype
    log.info("every checkpoint runs in %s", dtype)
    return EvalPlan(paths, samples, max_model_len, dtype)


def evaluate(config: EvalConfig, plan: EvalPlan, answers: Path | None = None) -> dict:
    """Run the suite on every checkpoint of the plan; the results (scores, intervals, outputs) as a dict.

    With ``answers`` (a directory), each checkpoint's answers are reused from there when the same checkpoint
    answered the same suite in the same engine before, and saved there when it had not.
    """
    from pipeline.provenance import package_versions

    names, samples = list(plan.paths), plan.samples
    runs = {name: _answers(config, plan, name, answers) for name in names}
    scores = np.array([[get_task(s.task).score(c.text, s.answers) for s, c in zip(samples, runs[n]["completions"])]
                       for n in names])
    cells, groups = cell_groups(samples)
    return {
        "config": _jsonable(dataclasses.asdict(config)),
        "models": {n: {"path": plan.paths[n], **_model_id(plan.paths[n])} for n in names},
        "suite": _suite(config, samples, cells),
        **summarize(scores, names, cells, groups, config.bootstrap, config.seed),
        "dtype": plan.dtype,
        "perplexity": {n: runs[n]["perplexity"] for n in names},
        "timing": {n: runs[n]["timing"] for n in names},
        "samples": [_sample_record(s, {n: (runs[n]["completions"][i], scores[k, i]) for k, n in enumerate(names)})
                    for i, s in enumerate(samples)],
        "packages": package_versions(),
    }


def _suite(config: EvalConfig, samples: list[EvalSample], cells: list[tuple[str, int]]) -> dict:
    """The suite's shape: its tasks, lengths and cells (``task@length``, in suite order)."""
    tasks, lengths = list(config.tasks), list(config.lengths)
    if config.cells is not None:  # explicit cells: the tasks and lengths they hold, in order of appearance
        tasks, lengths = list(dict.fromkeys(t for t, _ in cells)), sorted({n for _, n in cells})
    return {"num_samples": len(samples), "tasks": tasks, "lengths": lengths,
            "cells": [format_cell(t, n) for t, n in cells], "samples_per_cell": config.samples_per_cell,
            "seed": config.seed}


def common_dtype(paths: list[str]) -> str:
    """One dtype for every checkpoint: float32 if any is stored in float32, else the baseline's.

    Comparing a bf16 baseline with a float32 trained checkpoint in their own dtypes would mix the
    training effect with precision; casting the trained one to bf16 would round away small updates
    (a 1e-5 step is below bf16's resolution of most weights).
    """
    from transformers import AutoConfig

    from pipeline.placement import checkpoint_dtype

    names = [checkpoint_dtype(AutoConfig.from_pretrained(path)) for path in paths]
    return "float32" if "float32" in names else names[0]


def answers_key(config: EvalConfig, plan: EvalPlan, name: str) -> str:
    """What a checkpoint's answers depend on: its weights, the suite's prompts, the engine, the packages."""
    import hashlib

    from pipeline.provenance import package_versions

    path = plan.paths[name]
    identity = {
        "checkpoint": _model_id(path) or {"path": path},
        "engine": _jsonable(dataclasses.asdict(_engine(config, plan, path))) | {"model": None},
        "samples": [[s.id, s.prompt, s.max_tokens] for s in plan.samples],
        "perplexity": builtin_chat() if config.perplexity else None,
        "packages": package_versions(),
    }
    return "sha256:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _answers(config: EvalConfig, plan: EvalPlan, name: str, directory: Path | None) -> dict:
    """A checkpoint's answers: saved ones when their key matches, else a fresh engine run (then saved)."""
    if directory is None:
        return _run_checkpoint(config, plan, plan.paths[name])
    key, path = answers_key(config, plan, name), directory / f"{name}.json"
    saved = load_answers(path, key, len(plan.samples))
    if saved is not None:
        log.info("%s: answers reused from %s (same checkpoint, suite, engine and packages)", name, path)
        return saved
    run = _run_checkpoint(config, plan, plan.paths[name])
    record = {"key": key, "checkpoint": plan.paths[name],
              "run": {"perplexity": run["perplexity"], "timing": run["timing"]},
              "completions": [dataclasses.asdict(c) for c in run["completions"]]}
    write_text_atomically(path, json.dumps(record) + "\n")  # an interrupted write leaves the old file or none
    return run


def load_answers(path: Path, key: str, count: int) -> dict | None:
    """The answers saved at ``path`` if they were made under ``key`` and hold ``count`` completions, else None:
    a missing, damaged or other run's file is answered again, never trusted."""
    try:
        saved = json.loads(path.read_text())
        if saved["key"] != key or len(saved["completions"]) != count:
            return None
        completions = [Completion(**{**c, "token_ids": tuple(c["token_ids"])}) for c in saved["completions"]]
        return {"perplexity": saved["run"]["perplexity"], "timing": saved["run"]["timing"],
                "completions": completions}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _engine(config: EvalConfig, plan: EvalPlan, path: str):
    return dataclasses.replace(config.engine, model=path, max_model_len=plan.max_model_len, dtype=plan.dtype)


def _run_checkpoint(config: EvalConfig, plan: EvalPlan, path: str) -> dict:
    from vllm import SamplingParams

    from pipeline.engine import GatedLLM

    samples = plan.samples
    dialogues = builtin_chat() if config.perplexity else []
    t0 = time.perf_counter()
    llm = GatedLLM.from_config(_engine(config, plan, path))
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
        log.warning("%s: %d of %d prompts tokenized to another length than the suite measured", path, mismatched,
                    len(samples))
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
        text = render_chat(tokenizer, messages, generation_prompt=generation_prompt, **kwargs)
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
    outputs = llm.llm.generate([{"prompt_token_ids": ids} for ids in inputs],
                               SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll, count = 0.0, 0
    for ids, turns, out in zip(inputs, spans, outputs):
        positions = [j for a, b in turns for j in range(max(a, 1), b)] if assistant_only else range(1, len(ids))
        for j in positions:
            nll -= out.prompt_logprobs[j][ids[j]].logprob
            count += 1
    return {"perplexity": math.exp(nll / count), "tokens": count,
            "scored": "assistant turns" if assistant_only else "all tokens", "dialogues": len(dialogues)}


def _sample_record(s: EvalSample, outputs: dict) -> dict:
    return {"id": s.id, "task": s.task, "length": s.length, "num_tokens": s.num_tokens, "depths": list(s.depths),
            "answers": list(s.answers), "max_tokens": s.max_tokens,
            "outputs": {n: {"text": c.text, "score": float(score), "finish_reason": c.finish_reason}
                        for n, (c, score) in outputs.items()}}


def _model_id(path: str) -> dict:
    from pipeline.provenance import hash_model_dir

    return {"content_id": hash_model_dir(path)} if Path(path).is_dir() else {}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
