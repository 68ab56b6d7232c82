"""The generation stage: every prompt through every variant (normal, heads masked), as Parquet shards.

``generate(GenerateConfig(...))`` is the one entry point (``retmask generate`` and ``jobs/generate.py``
wrap it). The driver reads prompts lazily, feeds batches to a pool of Ray actors that each own one gated
vLLM engine (``pipeline.actors``, placed by ``pipeline.cluster``), and is the single writer of the output
directory: one shard per finished batch, committed through the manifest (``pipeline.shard_writer``). What
the run decides before any engine starts (model identity, masks, the manifest's run config) comes from
``pipeline.run_config``. A rerun with the same config resumes: committed prompt ids are skipped (every
committed shard verified against its checksum), and a run whose identity differs (model weights, revision,
dtype, context length, chat template, masks, sampling, seed) or a second concurrent writer is refused.
Credentials in URIs are redacted from all it writes. The driver never imports vLLM; it loads only the
tokenizer, to reject prompts too long for the context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from pipeline.engine import EngineConfig, EngineOptions
from retrieval_heads.config import opt
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS

log = logging.getLogger(__name__)

REJECTS = "rejects.jsonl"
# Fault injection for the reliability tests: RETMASK_FAULT_KILL_ACTOR_AFTER=<n> SIGKILLs a busy actor's
# process, as the OOM killer would, right after the driver commits its n-th shard.
FAULT_KILL_ACTOR_AFTER = "RETMASK_FAULT_KILL_ACTOR_AFTER"


@dataclass
class SamplingConfig:
    """vLLM sampling parameters; the defaults are RetMask's (docs/METHOD.md section 3)."""

    temperature: float = opt(0.6, "sampling temperature (RetMask: 0.6)")
    top_p: float = opt(1.0, "sample from the smallest token set holding this much probability; 1 = off")
    top_k: int = opt(0, "sample from the k most likely tokens; 0 = off")
    min_p: float = opt(0.0, "drop tokens below min_p x the most likely token's probability; 0 = off")
    n: int = opt(1, "must be 1: one response per prompt and variant")
    max_tokens: int = opt(2048, "response token limit (RetMask: 2048; 4096 for Qwen3 with thinking on)")
    frequency_penalty: float = opt(0.0, "penalty growing with a token's count in the response so far; 0 = off")
    presence_penalty: float = opt(0.0, "penalty on every token already in the response; 0 = off")
    repetition_penalty: float = opt(1.0, "multiplicative penalty on tokens of the prompt and response; 1 = off")


@dataclass
class GenerateConfig:
    """Everything a generation run decides; ``jobs/configs/*.yaml`` map 1:1 onto these fields."""

    model: str = opt(EMBEDDED_ALIAS, "alias, local checkpoint or hub id")
    prompts_source: str = opt("builtin", "jsonl | parquet | hf_dataset | lmsys | builtin")
    prompts: str | None = opt(None, "file or directory of the prompt source")
    prompt_options: dict = opt({}, "source options, e.g. text_field, id_field, split; for any source, repeats: N "
                               "uses each prompt N times in a row, copy k under id '<id>~k' (its own seed); "
                               "max_prompts counts the copies")
    max_prompts: int | None = opt(None, "use the first N valid prompts (counting committed ones)")
    scores: str = opt("runs/detect/head_scores.json", "head scores (Wu JSON) from `retmask detect` on this model")
    selection: str = opt("threshold", "threshold (mean score >= threshold) | top_k")
    threshold: float = opt(0.1, "selection threshold: every head with at least this mean score is masked")
    k: int = opt(5, "heads masked under selection top_k")
    variants: list[str] = opt(["normal", "retrieval_masked"], "'normal' first, then built-in retrieval_masked | "
                              "random_masked (as many random heads outside the retrieval set, seeded) or names "
                              "defined in variant_rules")
    variant_rules: dict = opt({}, "graded negatives: name -> {rule: none | threshold | top_k | random_nonretrieval "
                              "| random_all, threshold, k, like: <variant> (match its head count; random_nonretrieval "
                              "also avoids its heads), seed (default: seed)}")
    batching: str = opt("mixed", "mixed: every variant of a batch in one continuous batch, each request under its "
                        "own mask; switched: one engine call per variant, the mask switched engine-wide (the batch "
                        "drains at every switch)")
    sampling: SamplingConfig = opt(SamplingConfig, "vLLM sampling parameters, the same for every variant")
    seed: int = opt(0, "engine seed, per-prompt seeds and the random-head draw")
    max_model_len: int = opt(4096, "prompt + response tokens; longer prompts are rejected")
    chat_template_kwargs: dict = opt({}, "e.g. {enable_thinking: true} for Qwen3")
    engine: EngineOptions = opt(EngineOptions, "engine settings (dtype, kv_cache_memory_bytes, max_num_seqs, ...); "
                                "model, max_model_len, seed, chat template and tensor parallel size are this "
                                "config's own fields")
    out: str = opt("runs/generate", "output directory: local path or URI (s3://...)")
    num_actors: int = opt(1, "engines; on GPUs, GPUs / tensor_parallel_size")
    tensor_parallel_size: int = opt(1, "GPUs per engine")
    num_cpus_per_actor: float = opt(1.0, "CPU actors: Ray CPUs reserved per engine")
    cpu_bind: list[str] | None = opt(None, "CPU only: VLLM_CPU_OMP_THREADS_BIND per actor (actor i gets entry i); "
                                     "None = vLLM's auto binding")
    use_gpu: bool | None = opt(None, "None = GPUs if the Ray cluster has any")
    batch_size: int = opt(64, "prompts per engine call and per shard")
    batches_in_flight: int = opt(2, "per actor: one running, one queued behind it")
    max_retries: int = opt(3, "re-runs of a failed batch (on a fresh actor) before the run fails")
    strict: bool = opt(False, "a bad prompt row stops the run instead of going to rejects.jsonl")
    ray_address: str | None = opt(None, "None = $RAY_ADDRESS if set, else a local Ray")


def prompt_seed(run_seed: int, prompt_id: str) -> int:
    """Sampling seed of one prompt: stable across runs, machines and batch composition."""
    digest = hashlib.sha256(f"{run_seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------
# the run


def generate(config: GenerateConfig) -> dict:
    """Generate (or resume) the preference shards of ``config``; returns a summary of this session."""
    from transformers import AutoConfig

    from pipeline.run_config import chat_tokenizer, check_config, model_record, run_config, variant_masks
    from pipeline.shard_writer import open_run
    from retrieval_heads.models import shape_of

    check_config(config)
    load_path, model = model_record(config)
    files = model.get("files", load_path)
    hf_config = AutoConfig.from_pretrained(files)
    shape = shape_of(getattr(hf_config, "text_config", hf_config))
    heads, mask_record = variant_masks(config, shape)
    tokenizer = chat_tokenizer(files, config.model)
    record = run_config(config, model, mask_record, hf_config, tokenizer)
    writer = open_run(config.out, record, config.variants)  # refuses a different run or a second writer
    try:
        return _generate(config, writer, files, load_path, tokenizer, heads, mask_record)
    finally:
        writer.close()


def _generate(config: GenerateConfig, writer, files: str, load_path: str, tokenizer, heads: dict,
              mask_record: dict) -> dict:
    from pipeline import cluster
    from pipeline.prompts import load_prompts, token_limit
    from pipeline.run_config import token_counter

    committed_before = len(writer.committed_ids)
    budget = None if config.max_prompts is None else max(0, config.max_prompts - committed_before)
    limit = config.max_model_len - config.sampling.max_tokens
    stream = load_prompts(config.prompts_source, config.prompts, batch_size=config.batch_size,
                          checks=[token_limit(token_counter(tokenizer, config.chat_template_kwargs), limit)],
                          skip_ids=writer.committed_ids, **config.prompt_options)
    rejects = _Rejects(writer, config.strict)
    batches = _limited(stream, budget, rejects, config.seed)
    start = time.perf_counter()
    first = next(batches, None)  # engines start only if there is work: a finished run resumes in seconds
    if first is None and not writer.committed_ids and not rejects.error and budget != 0:
        _refuse_empty(config, writer, stream)
    rows = tokens = 0
    generation_seconds = 0.0
    pool = started_ray = None
    if first is not None:
        started_ray = cluster.connect(config.ray_address, num_cpus=_local_cpus(config))
        finished = False
        try:
            pool = _start_pool(config, load_path, heads)
            pool.wait_ready()
            rows, tokens, generation_seconds = _drive(pool, _chain(first, batches), writer, rejects, budget)
            finished = True
        finally:
            if pool is not None:
                pool.close(graceful=finished)  # on errors: kill at once, queued batches are not worth waiting for
            if started_ray:
                import ray

                ray.shutdown()
    rejects.flush(stream)
    rejects.raise_if_strict()
    seconds = time.perf_counter() - start
    summary = {
        "out": writer.out, "variants": config.variants, "masks": {v: m["id"] for v, m in mask_record.items()},
        "rows_written": rows, "rows_total": writer.num_rows, "shards": len(writer.manifest["shards"]),
        "already_committed": committed_before, "rejected": dict(stream.reject_counts), "tokens": tokens,
        # the rest of "seconds": engine start-up
        "seconds": round(seconds, 1), "generation_seconds": round(generation_seconds, 1),
        "prompts_per_s": round(rows / generation_seconds, 3) if rows else 0.0,
        "tokens_per_s": round(tokens / generation_seconds, 1) if rows else 0.0,
        "actor_replacements": pool.replacements if pool else 0,
    }
    log.info("generation done: %s", json.dumps(summary))
    return summary


def _refuse_empty(config: GenerateConfig, writer, stream) -> None:
    """A source without one usable prompt is a user error, and leaves no config-bound empty output behind."""
    writer.discard_if_new()
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(stream.reject_counts.items())) or "no rows at all"
    where = config.prompts or config.prompts_source
    raise RetmaskError(f"prompt source {where} ({config.prompts_source}) gave no usable prompt ({counts}); "
                       "fix the source or its options (prompt_options: text_field, id_field)")


def _local_cpus(config: GenerateConfig) -> int:
    return max(os.cpu_count() or 1, int(config.num_actors * config.num_cpus_per_actor + 0.999))


def _start_pool(config: GenerateConfig, load_path: str, heads: dict[str, list]):
    import ray

    from pipeline import actors
    from pipeline.cluster import actor_options

    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    engine = EngineConfig(**asdict(config.engine), model=load_path, max_model_len=config.max_model_len,
                          seed=config.seed, tensor_parallel_size=config.tensor_parallel_size,
                          chat_template_kwargs=config.chat_template_kwargs)
    # TP > 1: the engine's workers are Ray actors in this actor's placement group (one GPU bundle each).
    tensor_parallel = use_gpu and config.tensor_parallel_size > 1
    engine_kwargs = {"distributed_executor_backend": "ray"} if tensor_parallel else {}
    sampling = asdict(config.sampling)
    remote = ray.remote(actors.GenerationActor)
    groups: dict[int, Any] = {}

    def make(index: int):
        options = actor_options(config, index, groups, use_gpu)
        return remote.options(**options).remote(index, engine, engine_kwargs, sampling, heads,
                                                     mixed=config.batching == "mixed")

    return actors.ActorPool(make, config.num_actors, config.batches_in_flight, config.max_retries)


def _drive(pool, batches, writer, rejects: _Rejects, budget: int | None) -> tuple[int, int, float]:
    """Commit each finished batch as one shard (the driver is the manifest's only writer): (rows, tokens, s)."""
    from tqdm import tqdm

    kill_after = int(os.environ.get(FAULT_KILL_ACTOR_AFTER) or 0)  # fault injection (tests); 0: off
    rows = tokens = commits = 0
    start = time.perf_counter()
    with tqdm(total=budget, unit="prompt", desc="generate", dynamic_ncols=True) as bar:
        for batch, table, stats in pool.map_unordered(batches):
            if table.num_rows:  # a batch of poison prompts only leaves rejects, no shard
                writer.write_shard(table)
                rows, tokens, commits = rows + table.num_rows, tokens + stats["tokens"], commits + 1
            texts = {pid: text for pid, text, _ in batch}
            for pid, reason in stats.get("rejects", ()):  # prompts the engine failed on (pipeline.actors)
                rejects.add(pid, texts[pid], reason)
            elapsed = time.perf_counter() - start
            bar.update(len(batch))
            bar.set_postfix(tokens_per_s=f"{tokens / elapsed:.0f}", shards=len(writer.manifest["shards"]))
            rejects.flush(None)
            if table.num_rows and commits == kill_after:
                pool.crash_one()
    return rows, tokens, time.perf_counter() - start


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _limited(stream, budget: int | None, rejects: _Rejects, seed: int) -> Iterator[list[tuple[str, str, int]]]:
    """Batches of (id, text, seed), at most ``budget`` prompts; under strict, stops at the first reject."""
    left = budget
    for batch in stream:
        rejects.note(stream)
        if rejects.error:
            return
        if left is not None:
            batch = batch[:left]
            left -= len(batch)
        if batch:
            yield [(p.id, p.text, prompt_seed(seed, p.id)) for p in batch]
        if left == 0:
            return
    rejects.note(stream)


class _Rejects:
    """Keeps ``rejects.jsonl`` in the output directory up to date with the stream's rejects.

    Prompts the engine failed on join the stream's rejects (``add``), so one file and one count
    (``stream.reject_counts``, the summary's ``rejected``) hold every prompt without a row.
    """

    def __init__(self, writer, strict: bool):
        self.writer, self.strict = writer, strict
        self.stream, self.written, self.error = None, -1, None

    def note(self, stream) -> None:
        self.stream = stream
        if self.strict and stream.rejects and self.error is None:
            reject = stream.rejects[0]
            where = getattr(reject.row, "id", None) or json.dumps(reject.row, default=str)[:120]
            self.error = f"bad prompt row ({reject.reason}): {where}"

    def add(self, prompt_id: str, text: str, reason: str) -> None:
        """Record a prompt that left the run after the source (``reason`` reads ``"kind: detail"``)."""
        from pipeline.prompt_rows import Prompt, Reject

        self.stream._reject(Reject(Prompt(prompt_id, text), reason))
        self.note(self.stream)  # under strict, an engine reject stops the run like a bad row

    def flush(self, stream) -> None:
        from pipeline import shards

        stream = stream or self.stream
        if stream is None or len(stream.rejects) == self.written:
            return
        lines = [json.dumps({"reason": r.reason, "kind": r.kind, **_row(r.row)}, default=str)
                 for r in stream.rejects]
        data = ("\n".join(lines) + "\n" if lines else "").encode()
        try:
            shards._put(self.writer.fs, f"{self.writer.root}/{REJECTS}", data)
        except OSError as err:
            log.warning("could not write %s (%s)", REJECTS, err)
            return
        self.written = len(stream.rejects)

    def raise_if_strict(self) -> None:
        if self.error:
            raise RetmaskError(f"{self.error}; fix the source or run without --strict (committed shards are kept)")


def _row(row: Any) -> dict:
    if hasattr(row, "id") and hasattr(row, "text"):
        return {"prompt_id": row.id, "row": {"text": row.text[:500]}}
    text = json.dumps(row, default=str)
    return {"row": row if len(text) <= 2000 else text[:2000]}
