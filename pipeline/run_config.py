"""What a generation run is, decided before any engine starts: its model, masks, tokenizer and manifest record.

``pipeline.generate`` computes these once at start and ``retmask plan`` (``pipeline.plan``) computes the very
same from a model's ``config.json``, so a plan shows exactly the heads generate will gate and compares
exactly the record a resume compares. ``run_config`` is what ``manifest.json`` keeps under ``run_config``;
its ``IDENTITY_KEYS`` (``pipeline.shard_schema``) must match when an existing output is resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS, ModelShape, render_chat

if TYPE_CHECKING:
    from pipeline.generate import GenerateConfig

VARIANTS = ("normal", "retrieval_masked", "random_masked")
SELECTIONS = ("threshold", "top_k")


def check_config(config: GenerateConfig) -> None:
    """Refuse settings no run can honour, each in one line naming the field."""
    from pipeline.prompts import check_repeats

    check_repeats(config.prompt_options.get("repeats", 1))  # before the output directory exists
    variants = config.variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or variants[0] != "normal" or len(set(variants)) != len(variants):
        raise RetmaskError(f"variants must start with 'normal' and name distinct variants from {list(VARIANTS)}, "
                           f"got {variants}")
    if config.selection not in SELECTIONS:
        raise RetmaskError(f"selection must be one of {list(SELECTIONS)}, got {config.selection!r}")
    if config.sampling.n != 1:
        raise RetmaskError("sampling.n must be 1: each variant gives one response per prompt")
    for name in ("num_actors", "tensor_parallel_size", "batch_size", "batches_in_flight"):
        if getattr(config, name) < 1:
            raise RetmaskError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not 0 < config.sampling.max_tokens < config.max_model_len:
        raise RetmaskError(f"sampling.max_tokens={config.sampling.max_tokens} must be between 1 and "
                           f"max_model_len={config.max_model_len}")
    if config.max_prompts is not None and config.max_prompts < 0:
        raise RetmaskError(f"max_prompts must be >= 0, got {config.max_prompts}")


def model_record(config: GenerateConfig) -> tuple[str, dict]:
    """(local path or hub id to load, the manifest's model record)."""
    from pipeline.provenance import hash_model_dir
    from retrieval_heads.models import resolve_model

    path = resolve_model(config.model)
    if Path(path).is_dir():
        # The id must survive moving the checkpoint (resume checks it): alias or directory name.
        model_id = config.model if config.model == EMBEDDED_ALIAS else Path(path).name
        return path, {"id": model_id, "path": path, "hash": hash_model_dir(path)}
    from huggingface_hub import snapshot_download

    try:  # config and tokenizer files only: enough for the shape, the tokenizer and a content id
        local = snapshot_download(path, allow_patterns=["*.json", "*.jinja", "*.model", "*.txt"])
    except Exception as err:  # hub errors come in many types (offline, gated, missing)
        raise RetmaskError(f"cannot fetch the config of {path} from the hub ({type(err).__name__}: {err})") from None
    return path, {"id": path, "path": path, "revision": Path(local).name, "hash": hash_model_dir(local),
                  "files": local}


def variant_masks(config: GenerateConfig, shape: ModelShape) -> tuple[dict[str, list], dict]:
    """Heads gated per variant, and their manifest record (mask ids, selection rule, score digest)."""
    from retrieval_heads.masking import HeadMask, select_mask
    from retrieval_heads.scores import HeadScores

    if config.variants == ["normal"]:
        return {"normal": []}, {"normal": HeadMask.for_shape((), shape).to_dict()}
    scores = HeadScores.load(config.scores)  # loaded once: both masks and the record's digest come from it
    rule = {"threshold": config.threshold} if config.selection == "threshold" else {"k": config.k}
    retrieval = select_mask(scores, config.selection, shape, **rule)
    if not retrieval.heads:
        raise RetmaskError(f"no head in {config.scores} has a mean score >= {config.threshold}; "
                           "lower threshold or use selection top_k")
    heads = {"normal": [], "retrieval_masked": list(retrieval.heads)}
    random_rule = {"k": len(retrieval), "seed": config.seed}
    if "random_masked" in config.variants:
        control = select_mask(scores, "random_nonretrieval", shape, **random_rule, exclude=list(retrieval.heads))
        heads["random_masked"] = list(control.heads)
    heads = {v: heads[v] for v in config.variants}
    selection = {"retrieval_masked": {"strategy": config.selection, **rule},
                 "random_masked": {"strategy": "random_nonretrieval", **random_rule, "exclude": "retrieval_masked"}}
    record = {}
    for v, hs in heads.items():
        record[v] = HeadMask.for_shape(hs, shape).to_dict()
        if v != "normal":
            record[v].update(selection=selection[v], scores_digest=scores.digest())
    return heads, record


def run_config(config: GenerateConfig, model: dict, masks: dict, hf_config: Any, tokenizer: Any) -> dict:
    """What the manifest records as ``run_config``; its ``IDENTITY_KEYS`` must match on resume."""
    from pipeline.provenance import package_versions
    from retrieval_heads.errors import redact_all

    sampling = {**dataclasses.asdict(config.sampling), "max_model_len": config.max_model_len,
                "chat_template_kwargs": config.chat_template_kwargs}
    generation = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("model", "sampling", "seed")}
    generation["engine"] = _changed_options(config.engine)
    # dtype changes the numerics (hence the sampled tokens); "auto" is pinned to the checkpoint's dtype
    checkpoint = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "unknown")
    engine = {"dtype": config.engine.dtype, "checkpoint_dtype": checkpoint.removeprefix("torch."),
              "max_model_len": config.max_model_len}
    template = json.dumps(tokenizer.chat_template, sort_keys=True)
    chat_template = {"sha256": hashlib.sha256(template.encode()).hexdigest(), "kwargs": config.chat_template_kwargs}
    # redacted: the output URI (and any other) may carry credentials, and the manifest is shared with the data
    return redact_all({"model": {k: v for k, v in model.items() if k != "files"}, "masks": masks,
                       "sampling": sampling, "seed": config.seed, "engine": engine, "chat_template": chat_template,
                       "scores_file": config.scores if len(masks) > 1 else None,
                       "generation": generation, "packages": package_versions()})


def _changed_options(options: Any) -> dict:
    """The engine options set away from their defaults (the rest is the code's, and ``packages`` names it)."""
    defaults = type(options)()
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(defaults, f.name)}


def chat_tokenizer(model_files: str, model: str) -> Any:
    """The model's tokenizer; generation renders every prompt as chat, so a chat template is required."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_files)
    if not tokenizer.chat_template:
        raise RetmaskError(f"model {model} has no chat template (tokenizer_config.json or chat_template.jinja); "
                           "RetMask generates chat responses: use an instruct/chat checkpoint or add its template")
    return tokenizer


def token_counter(tokenizer: Any, chat_template_kwargs: dict) -> Callable[[str], int]:
    """Prompt length after the chat template, counted as ``GatedLLM.render`` does."""

    def count(text: str) -> int:
        return len(tokenizer.encode(render_chat(tokenizer, text, **chat_template_kwargs), add_special_tokens=False))

    return count
