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

from pipeline.placement import MAX_MASKS
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS, ModelShape, render_chat

if TYPE_CHECKING:
    from pipeline.generate import GenerateConfig

BUILTIN_VARIANTS = ("normal", "retrieval_masked", "random_masked")
RULES = ("none", "threshold", "top_k", "random_nonretrieval", "random_all")
SELECTIONS = ("threshold", "top_k")
BATCHING = ("mixed", "switched")
_RULE_KEYS = {"none": set(), "threshold": {"threshold"}, "top_k": {"k"},
              "random_nonretrieval": {"k", "like", "seed"}, "random_all": {"k", "like", "seed"}}


def check_config(config: GenerateConfig) -> None:
    """Refuse settings no run can honour, each in one line naming the field."""
    from pipeline.prompts import check_repeats

    check_repeats(config.prompt_options.get("repeats", 1))  # before the output directory exists
    rules = variant_rules(config)  # refuses unknown names, rules and keys, each in one line
    if config.batching not in BATCHING:
        raise RetmaskError(f"batching must be one of {list(BATCHING)}, got {config.batching!r}")
    masked = sum(1 for rule in rules.values() if rule["rule"] != "none")
    if config.batching == "mixed" and masked > MAX_MASKS - 1:
        raise RetmaskError(f"{masked} masked variants, but one mixed batch holds at most {MAX_MASKS - 1} masks; "
                           "drop variants or set batching: switched")
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


def variant_rules(config: GenerateConfig) -> dict[str, dict]:
    """Each variant's head-selection rule, in ``config.variants`` order.

    The built-in names are rules too: ``normal`` gates nothing, ``retrieval_masked`` follows the config's
    ``selection``/``threshold``/``k``, and ``random_masked`` draws as many random heads outside it. Any other
    name (a graded negative) is defined in ``variant_rules``: ``{rule, threshold | k | like, seed}``, where
    ``like: V`` takes V's head count (and, for ``random_nonretrieval``, avoids V's heads).
    """
    variants, custom = list(config.variants), dict(config.variant_rules)
    if not variants or variants[0] != "normal" or len(set(variants)) != len(variants):
        raise RetmaskError(f"variants must start with 'normal' and name distinct variants, got {variants}")
    if config.selection not in SELECTIONS:
        raise RetmaskError(f"selection must be one of {list(SELECTIONS)}, got {config.selection!r}")
    shadowing = sorted(set(custom) & set(BUILTIN_VARIANTS))
    unused = sorted(set(custom) - set(variants))
    unknown = [v for v in variants if v not in BUILTIN_VARIANTS and v not in custom]
    if shadowing or unused or unknown:
        what = (f"{shadowing} are built-in variants: give yours other names" if shadowing else
                f"variant_rules defines {unused} but variants does not list them" if unused else
                f"variants {unknown} are neither built in {list(BUILTIN_VARIANTS)} nor defined in variant_rules")
        raise RetmaskError(f"{what} (variants: {variants})")
    builtin = {"normal": {"rule": "none"},
               "retrieval_masked": {"rule": config.selection, **_selection_option(config)},
               "random_masked": {"rule": "random_nonretrieval", "like": "retrieval_masked", "seed": config.seed}}
    rules = {}
    for v in variants:
        rule = dict(builtin[v]) if v in builtin else _custom_rule(v, custom[v], config.seed)
        like = rule.get("like")
        if like is not None and (like not in variants or builtin.get(like, custom.get(like, {})).get("like")):
            raise RetmaskError(f"variant_rules.{v}.like={like!r} must name a listed variant selected by rule, "
                               f"not by like (variants: {variants})")
        rules[v] = rule
    return rules


def _selection_option(config: GenerateConfig) -> dict:
    return {"threshold": config.threshold} if config.selection == "threshold" else {"k": config.k}


def _custom_rule(name: str, rule: object, seed: int) -> dict:
    where = f"variant_rules.{name}"
    if not isinstance(rule, dict) or rule.get("rule") not in RULES:
        raise RetmaskError(f"{where} must be a mapping with rule: one of {list(RULES)}, got {rule!r}")
    extra = sorted(set(rule) - {"rule"} - _RULE_KEYS[rule["rule"]])
    if extra:
        raise RetmaskError(f"{where}: rule {rule['rule']} takes {sorted(_RULE_KEYS[rule['rule']])}, not {extra}")
    needed = {"threshold": "threshold", "top_k": "k"}.get(rule["rule"])
    if needed and needed not in rule:
        raise RetmaskError(f"{where}: rule {rule['rule']} needs {needed}")
    if rule["rule"].startswith("random") and ("k" in rule) == ("like" in rule):
        raise RetmaskError(f"{where}: rule {rule['rule']} needs exactly one of k (a head count) or like (a variant "
                           "whose head count to match)")
    return {"seed": seed, **rule} if rule["rule"].startswith("random") else dict(rule)


def variant_masks(config: GenerateConfig, shape: ModelShape) -> tuple[dict[str, list], dict]:
    """Heads gated per variant, and their manifest record (mask ids, selection rule, score digest)."""
    from retrieval_heads.masking import HeadMask, select_mask
    from retrieval_heads.scores import HeadScores

    rules = variant_rules(config)
    if all(r["rule"] == "none" for r in rules.values()):
        return {v: [] for v in rules}, {v: HeadMask.for_shape((), shape).to_dict() for v in rules}
    scores = HeadScores.load(config.scores)  # loaded once: every mask and the record's digest come from it
    heads: dict[str, list] = {}
    selection: dict[str, dict] = {}
    for v, rule in sorted(rules.items(), key=lambda item: "like" in item[1]):  # a like's target first
        options = {k: rule[k] for k in ("threshold", "k", "seed") if k in rule}
        if "like" in rule:
            options["k"] = len(heads[rule["like"]])
            if rule["rule"] == "random_nonretrieval":
                options["exclude"] = heads[rule["like"]]
        if rule["rule"] == "none":
            heads[v] = []
        elif options.get("k") == 0:
            raise RetmaskError(f"variant {v} takes as many heads as {rule['like']}, which gates none")
        else:
            heads[v] = list(select_mask(scores, rule["rule"], shape, **options).heads)
        if rule["rule"] == "threshold" and not heads[v]:
            raise RetmaskError(f"no head in {config.scores} has a mean score >= {rule['threshold']} (variant {v}); "
                               "lower the threshold or select top_k")
        selection[v] = {"strategy": rule["rule"], **options}
        if "exclude" in options:
            selection[v]["exclude"] = rule["like"]
    heads = {v: heads[v] for v in config.variants}
    record = {}
    for v, hs in heads.items():
        record[v] = HeadMask.for_shape(hs, shape).to_dict()
        if rules[v]["rule"] != "none":
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
