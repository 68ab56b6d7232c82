"""``retmask plan``: check a generation run against the model's ``config.json`` alone, before it costs GPU hours.

``plan(GenerateConfig)`` reads what ``retmask generate`` reads first (config.json, the score file, the prompt
source, the output manifest) and none of what is expensive: no weights, no engine, no vLLM, no Ray. It
reports, in order: the shape; every variant's heads, selected as generate selects them
(``pipeline.run_config``); the rank that gates each head under the configured tensor parallel size
(``pipeline.placement``, shared with the engine); memory per GPU; the prompt source, streamed with a row
cap; and whether the output is new, resumes or is refused. Whatever would make generate refuse, or an
engine fail to start, is a problem; ``format_plan`` prints the whole report and the CLI then exits 1.

Nothing is written to the output location; how its section decides new, resume or refused without writing
is in ``pipeline.output_check``.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval_heads.errors import RetmaskError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
GIB = 2**30


@dataclass
class PlanReport:
    """Report lines by section (in order), the problems found, and the key figures for programs."""

    sections: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, line: str) -> None:
        self.sections.setdefault(section, []).append(line)

    def problem(self, section: str, message: str) -> None:
        message = " ".join(str(message).split())
        self.problems.append(f"{section}: {message}")
        self.add(section, f"PROBLEM: {message}")

    def summary(self) -> str:
        """One line naming every problem (what the CLI prints as its error)."""
        n = len(self.problems)
        return f"plan found {n} problem{'s' if n > 1 else ''}: " + "; ".join(self.problems)


def plan(config, *, gpu_memory_gb: float = 80.0, gpus_per_node: int = 8,
         max_rows: int | None = 10_000) -> PlanReport:
    """Check ``config`` (a ``GenerateConfig``) without weights or an engine; ``max_rows`` None scans every row."""
    from pipeline.output_check import check_output
    from pipeline.run_config import check_config
    from retrieval_heads.models import shape_of

    if not gpu_memory_gb > 0 or gpus_per_node < 1 or (max_rows is not None and max_rows < 1):
        raise RetmaskError(f"gpu_memory_gb must be > 0, gpus_per_node >= 1 and max_rows >= 1 (or all), got "
                           f"{gpu_memory_gb}, {gpus_per_node}, {max_rows}")
    report = PlanReport()
    try:
        check_config(config)
    except RetmaskError as err:
        report.problem("config", str(err))
    files, hub_record = _model_files(config)
    hf_config = _hf_config(files, config.model)
    text_config = getattr(hf_config, "text_config", hf_config)
    shape = shape_of(text_config)
    scores_ok = _shape(report, config, shape, hf_config, text_config, files)
    heads, masks = _variants(report, config, shape, scores_ok)
    _tensor_parallel(report, config, shape, heads, gpus_per_node)
    _memory(report, config, shape, hf_config, text_config, gpu_memory_gb, gpus_per_node)
    tokenizer = _prompts(report, config, files, max_rows)
    check_output(report, config, hf_config, masks, tokenizer, hub_record)
    return report


def format_plan(report: PlanReport) -> str:
    """The report as text: each section, then the problems (or that there are none)."""
    out = []
    for title, lines in report.sections.items():
        out.append(f"== {title} ==")
        out += [textwrap.fill(line, 118, subsequent_indent="      ", break_on_hyphens=False) for line in lines]
        out.append("")
    if report.problems:
        out.append(f"{len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}:")
        out += [f"  - {p}" for p in report.problems]
    else:
        out.append("no problems found")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# the model's config.json


def _model_files(config) -> tuple[str, dict | None]:
    """Directory holding config.json (and the tokenizer, when there is one); the model record of a hub id."""
    from pipeline.run_config import model_record
    from retrieval_heads.models import resolve_model

    path = resolve_model(config.model)
    if Path(path).is_dir():
        return path, None
    try:
        _, record = model_record(config)  # config and tokenizer files only, as generate fetches them
    except RetmaskError as err:
        reason = " ".join(str(err).split())
        if len(reason) > 240:  # hub errors run to paragraphs; the first words say what failed
            reason = reason[:240].rsplit(" ", 1)[0] + " ...)"
        raise RetmaskError(f"{reason}; without the hub, pass --model a local directory holding the model's "
                           "config.json (the tokenizer files too, for the prompt-length check)") from None
    return record["files"], record


def _hf_config(files: str, model: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(files)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:300]
        raise RetmaskError(f"cannot read the config.json of {model} in {files} ({reason}); "
                           "point --model at a Hugging Face checkpoint directory") from None


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _shape(report, config, shape, hf_config, text_config, files) -> bool:
    """Shape lines; returns whether the score file matches it (so heads can be selected)."""
    from pipeline.placement import check_context, checkpoint_dtype
    from retrieval_heads.scores import HeadScores

    s = "shape"
    arch = ",".join(getattr(hf_config, "architectures", None) or ["?"])
    report.add(s, f"model {config.model} ({arch}, {getattr(hf_config, 'model_type', '?')}), config from {files}")
    group = f"GQA {shape.num_heads // shape.num_kv_heads}:1" if shape.num_kv_heads < shape.num_heads else "MHA"
    report.add(s, f"{shape.num_layers} layers x {shape.num_heads} query heads = {shape.num_heads_total} heads; "
                  f"{shape.num_kv_heads} KV heads ({group}); head_dim {shape.head_dim}")
    report.add(s, f"dtype: checkpoint {checkpoint_dtype(hf_config)}, engine {config.engine.dtype}")
    report.add(s, f"max_position_embeddings {shape.max_position_embeddings}; "
                  f"this run's max_model_len {config.max_model_len}")
    layer_types = getattr(text_config, "layer_types", None) or []
    sliding = sum(1 for t in layer_types if t == "sliding_attention")
    if sliding:
        report.add(s, f"{sliding} of {shape.num_layers} layers attend within a sliding window of "
                      f"{getattr(text_config, 'sliding_window', '?')} tokens")
    report.values.update(shape=shape, params=None)
    try:
        check_context(config, shape)
    except RetmaskError as err:
        report.problem(s, str(err))
    if all(v == "normal" or config.variant_rules.get(v, {}).get("rule") == "none" for v in config.variants):
        report.add(s, "score file: not used (no variant gates a head)")
        return True
    try:
        scores = HeadScores.load(config.scores)
        scores.check_shape(shape)
    except RetmaskError as err:
        report.problem(s, str(err))
        return False
    report.add(s, f"score file {config.scores}: {len(scores.trials)} heads (trials: {scores.num_trials()}); "
                  f"matches {shape.num_layers}x{shape.num_heads}")
    return True


def _variants(report, config, shape, scores_ok: bool) -> tuple[dict | None, dict | None]:
    from pipeline.placement import MAX_MASKS
    from pipeline.run_config import variant_masks

    s = "variants"
    if not scores_ok:
        report.add(s, "not computed: the score file does not fit this model (see shape)")
        return None, None
    try:
        heads, record = variant_masks(config, shape)  # exactly the heads generate will gate
    except RetmaskError as err:
        report.problem(s, str(err))
        return None, None
    for variant, hs in heads.items():
        if not hs:
            report.add(s, f"{variant}: no head gated (the plain model)")
            continue
        rule = record[variant]["selection"]
        if rule["strategy"] == "threshold":
            how = f"every head with mean score >= {rule['threshold']}"
        elif rule["strategy"] == "top_k":
            how = f"the {rule['k']} best heads by mean score"
        elif rule["strategy"] == "random_all":
            how = f"{rule['k']} random heads, seed {rule['seed']}"
        else:
            outside = rule.get("exclude", f"the top {rule['k']}")
            how = f"{rule['k']} random heads outside {outside}, seed {rule['seed']}"
        mask = record[variant]
        report.add(s, f"{variant}: {how} -> {len(hs)} heads (mask {mask['id']}): {mask['heads']}")
    masks = len({tuple(hs) for hs in heads.values() if hs})
    if config.batching == "mixed":
        report.add(s, f"batching mixed: every variant of a batch in one continuous batch ({masks} per-request "
                      f"mask(s) of the gate's {MAX_MASKS - 1} slots)")
    else:
        report.add(s, f"batching switched: {len(heads)} engine calls per batch, the mask switched between them")
    report.values["heads"] = heads
    return heads, record


def _tensor_parallel(report, config, shape, heads: dict | None, gpus_per_node: int) -> None:
    from pipeline.placement import check_tensor_parallel, kv_heads_per_rank, local_heads

    s, tp = "tensor parallel", config.tensor_parallel_size
    try:
        per_rank = check_tensor_parallel(shape, tp)
    except RetmaskError as err:
        report.problem(s, str(err))
        return
    kv = kv_heads_per_rank(shape, tp)
    copies = f", each held by {tp // shape.num_kv_heads} ranks" if tp > shape.num_kv_heads else ""
    ranges = f" (rank r: heads {per_rank}r..{per_rank}r+{per_rank - 1})" if tp > 1 else ""
    report.add(s, f"tensor_parallel_size {tp}: each rank holds {per_rank} query heads{ranges} "
                  f"and {kv} KV heads{copies}")
    if tp > gpus_per_node:
        report.problem(s, f"tensor_parallel_size={tp} exceeds the {gpus_per_node} GPUs of a node; an engine's GPUs "
                          "must share one node: lower tensor_parallel_size or pass --gpus-per-node")
    for variant, hs in (heads or {}).items():
        if not hs:
            continue
        for rank in range(tp):
            mine = local_heads(hs, shape, tp, rank)
            held = " ".join(f"{layer}:{','.join(map(str, sorted(on_rank)))}" for layer, on_rank in sorted(mine.items()))
            count = sum(len(v) for v in mine.values())
            report.add(s, f"{variant}, rank {rank} gates {count} local heads (layer:local index) {held or '-'}")


def _memory(report, config, shape, hf_config, text_config, gpu_memory_gb, gpus_per_node) -> None:
    from pipeline.placement import dtype_bytes, kv_bytes_for_one_request, kv_bytes_per_token, parameter_count

    s, tp = "memory per engine", max(1, config.tensor_parallel_size)
    engine = config.engine
    dtype, value_bytes = engine.dtype, dtype_bytes(engine.dtype, hf_config)
    try:
        params = parameter_count(text_config)
    except AttributeError as err:
        report.add(s, f"not estimated: config.json lacks a field the estimate needs ({err})")
        return
    weights = params * value_bytes
    per_gpu_weights = weights / tp
    report.values.update(params=params, weights_bytes=weights)
    tied = "tied" if getattr(text_config, "tie_word_embeddings", False) else "untied"
    report.add(s, f"parameters ~{params / 1e9:.2f} B (from config.json, {tied} embeddings); weights "
                  f"{_gib(weights)} in {dtype}{'' if dtype != 'auto' else ' (the checkpoint dtype)'}, "
                  f"{_gib(per_gpu_weights)} per GPU at TP {tp}")
    per_token = kv_bytes_per_token(shape, tp, value_bytes)
    seqs, length = engine.max_num_seqs, config.max_model_len
    full = seqs * length * per_token
    report.add(s, f"KV cache {per_token / 2**10:.0f} KiB per token per GPU; max_num_seqs {seqs} x max_model_len "
                  f"{length} = {seqs * length:,} tokens need {_gib(full)} per GPU")
    layer_types = getattr(text_config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        report.add(s, "(an upper bound: sliding-window layers are counted at full length)")
    one = kv_bytes_for_one_request(shape, tp, value_bytes, length)
    total = gpu_memory_gb * GIB
    if engine.kv_cache_memory_bytes:
        kv_space = int(engine.kv_cache_memory_bytes)
        report.add(s, f"KV cache fixed by kv_cache_memory_bytes: {_gib(kv_space)}; GPU {gpu_memory_gb:g} GiB")
        if per_gpu_weights + kv_space > total:
            report.problem(s, f"weights ({_gib(per_gpu_weights)}) and kv_cache_memory_bytes ({_gib(kv_space)}) "
                              f"exceed a {gpu_memory_gb:g} GiB GPU; lower kv_cache_memory_bytes or raise "
                              "tensor_parallel_size")
    else:
        util = float(engine.gpu_memory_utilization)
        budget = util * total
        kv_space = budget - per_gpu_weights
        report.add(s, f"budget gpu_memory_utilization {util:g} x {gpu_memory_gb:g} GiB = {_gib(budget)} per GPU; "
                      f"{_gib(max(kv_space, 0))} left for the KV cache (activations and CUDA graphs, a few GiB, "
                      "are measured by vLLM at start and not counted here)")
        if kv_space <= 0:
            report.problem(s, f"weights need {_gib(per_gpu_weights)} per GPU, more than gpu_memory_utilization x GPU "
                              f"memory = {_gib(budget)}; raise tensor_parallel_size, gpu_memory_utilization or "
                              "--gpu-memory-gb")
    if kv_space > 0 and kv_space < one:
        report.problem(s, f"the KV cache ({_gib(kv_space)}) cannot hold one {length}-token request (needs "
                          f"{_gib(one)}); lower max_model_len or give the KV cache more memory")
    elif kv_space > 0:
        fit = int(kv_space // (length * per_token))
        at_once = "all of them" if fit >= seqs else f"vLLM queues the rest of the {seqs}"
        report.add(s, f"-> {min(fit, seqs)} sequences of full length fit at once ({at_once})")
    per_node = gpus_per_node // tp
    gpus = config.num_actors * tp
    report.values["engines_per_node"] = per_node
    report.add(s, f"engines per node: {per_node} ({gpus_per_node} GPUs / TP {tp}); num_actors {config.num_actors} "
                  f"-> {gpus} GPUs = {-(-gpus // gpus_per_node)} node(s)")


def _prompts(report, config, files: str, max_rows: int | None):
    """Stream the source as generate would (token-length check included when a tokenizer is here)."""
    from pipeline.prompts import load_prompts, token_limit
    from pipeline.run_config import chat_tokenizer, token_counter

    s = "prompt source"
    where = config.prompts or "(packaged)"
    cap = "every row" if max_rows is None else f"at most {max_rows:,} rows (--max-rows 0 reads all)"
    report.add(s, f"{config.prompts_source}: {where}; scanning {cap}")
    tokenizer, checks = None, []
    limit = config.max_model_len - config.sampling.max_tokens
    if any((Path(files) / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = chat_tokenizer(files, config.model)
        except RetmaskError as err:
            report.problem(s, str(err))
        else:
            checks = [token_limit(token_counter(tokenizer, config.chat_template_kwargs), limit)]
            report.add(s, f"prompts longer than {limit} tokens (max_model_len - max_tokens, after the chat template) "
                          "are rejected")
    if not checks:
        report.add(s, f"no tokenizer in {files}: the token-length check (<= {limit} tokens) was skipped")
    quiet = logging.getLogger("pipeline.prompts")
    level = quiet.level
    # the reject counts are in the report; the stream's own warning would repeat them
    quiet.setLevel(logging.ERROR)
    try:
        batch = 256 if max_rows is None else min(256, max_rows)  # the stream hands over a batch at a time
        stream = load_prompts(config.prompts_source, config.prompts, batch_size=batch, checks=checks,
                              **config.prompt_options)
        complete = True
        for _ in stream:
            if max_rows is not None and stream.num_rows >= max_rows:
                complete = False
                break
    except RetmaskError as err:
        report.problem(s, str(err))
        return tokenizer
    finally:
        quiet.setLevel(level)
    read = stream.num_rows  # source rows; a row yields `repeats` prompt instances, which generate and max_prompts count
    report.values.update(rows=read, usable=stream.num_prompts, rejects=dict(stream.reject_counts))
    report.add(s, f"rows read: {read:,} ({'the whole source' if complete else 'stopped at the cap'})")
    capped = f" (max_prompts {config.max_prompts} caps the run)" if config.max_prompts is not None else ""
    repeated = f" ({stream.repeats} uses of each valid row: prompt_options.repeats)" if stream.repeats > 1 else ""
    report.add(s, f"usable prompts: {stream.num_prompts:,}{repeated}{capped}")
    rejected = ", ".join(f"{n:,} {kind}" for kind, n in sorted(stream.reject_counts.items())) or "none"
    report.add(s, f"rejected: {rejected}")
    if stream.num_prompts == 0:
        report.problem(s, f"no usable prompt in {read:,} rows of {where}; fix the source or prompt_options "
                          "(text_field, id_field)")
    return tokenizer
