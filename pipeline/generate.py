"""The generation stage: every prompt through every variant (normal, heads masked), as Parquet shards.

``generate(GenerateConfig(...))`` is the one entry point (``retmask generate`` and ``jobs/generate.py``
wrap it). The driver reads prompts lazily, feeds batches to a pool of Ray actors that each own one gated
vLLM engine (``pipeline.actors``), and is the single writer of the output directory: one shard per
finished batch, committed through the manifest (``pipeline.shards``). A rerun with the same config
resumes: committed prompt ids are skipped (every committed shard verified against its checksum), and a
run whose identity differs (model weights, revision, dtype, context length, chat template, masks, sampling,
seed) or a second concurrent writer is refused. Credentials in URIs are redacted from all it writes.
The driver never imports vLLM; it loads only the tokenizer, to reject prompts too long for the context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS

log = logging.getLogger(__name__)

VARIANTS = ("normal", "retrieval_masked", "random_masked")
REJECTS = "rejects.jsonl"
SELECTIONS = ("threshold", "top_k")
# How long an engine's placement group may wait for one node with its GPUs free before the run stops
# (a tensor-parallel size no node holds would otherwise wait forever); an autoscaler may need minutes.
PLACEMENT_SECONDS = float(os.environ.get("RETMASK_PLACEMENT_SECONDS", 600))


@dataclass
class SamplingConfig:
    """vLLM sampling parameters; the defaults are RetMask's (docs/METHOD.md section 3)."""

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = field(default=0, metadata={"help": "0 = off"})
    min_p: float = 0.0
    n: int = field(default=1, metadata={"help": "must be 1: one response per prompt and variant"})
    max_tokens: int = field(default=2048, metadata={"help": "4096 for Qwen3 with thinking on"})
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass
class GenerateConfig:
    """Everything a generation run decides; ``jobs/configs/*.yaml`` map 1:1 onto these fields."""

    model: str = field(default=EMBEDDED_ALIAS, metadata={"help": "alias, local checkpoint or hub id"})
    prompts_source: str = field(default="builtin", metadata={"help": "jsonl | parquet | hf_dataset | lmsys | builtin"})
    prompts: str | None = field(default=None, metadata={"help": "file or directory of the prompt source"})
    prompt_options: dict = field(default_factory=dict, metadata={"help": "source options, e.g. text_field, id_field, split"})
    max_prompts: int | None = field(default=None, metadata={"help": "use the first N valid prompts (counting committed ones)"})
    scores: str = field(default="runs/demo/detect/head_scores.json", metadata={"help": "head scores (Wu JSON) from `retmask detect` on this model"})
    selection: str = field(default="threshold", metadata={"help": "threshold (mean score >= threshold) | top_k"})
    threshold: float = 0.1
    k: int = field(default=5, metadata={"help": "heads masked under selection top_k"})
    variants: list[str] = field(default_factory=lambda: ["normal", "retrieval_masked"], metadata={
        "help": "normal | retrieval_masked | random_masked (as many random heads outside the retrieval set, seeded)"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = field(default=0, metadata={"help": "engine seed, per-prompt seeds and the random-head draw"})
    max_model_len: int = field(default=4096, metadata={"help": "prompt + response tokens; longer prompts are rejected"})
    chat_template_kwargs: dict = field(default_factory=dict, metadata={"help": "e.g. {enable_thinking: true} for Qwen3"})
    engine: dict = field(default_factory=dict, metadata={"help": "other EngineConfig fields (dtype, kv_cache_memory_bytes, ...)"})
    out: str = field(default="runs/generate", metadata={"help": "output directory: local path or URI (s3://...)"})
    num_actors: int = field(default=1, metadata={"help": "engines; on GPUs, GPUs / tensor_parallel_size"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per engine"})
    num_cpus_per_actor: float = field(default=1.0, metadata={"help": "CPU actors: Ray CPUs reserved per engine"})
    cpu_bind: list[str] | None = field(default=None, metadata={
        "help": "CPU only: VLLM_CPU_OMP_THREADS_BIND per actor (actor i gets entry i); None = vLLM's auto binding"})
    use_gpu: bool | None = field(default=None, metadata={"help": "None = GPUs if the Ray cluster has any"})
    batch_size: int = field(default=64, metadata={"help": "prompts per engine call and per shard"})
    batches_in_flight: int = field(default=2, metadata={"help": "per actor: one running, one queued behind it"})
    max_retries: int = field(default=3, metadata={"help": "re-runs of a failed batch (on a fresh actor) before the run fails"})
    strict: bool = field(default=False, metadata={"help": "a bad prompt row stops the run instead of going to rejects.jsonl"})
    ray_address: str | None = field(default=None, metadata={"help": "None = $RAY_ADDRESS if set, else a local Ray"})
    kill_actor_after_batches: int | None = field(default=None, metadata={"help": "fault injection (tests): SIGKILL an actor after N commits"})

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "GenerateConfig":
        """Build from a YAML-style mapping; unknown keys are a user error naming the valid ones."""
        from retrieval_heads.config_types import check_field_types

        data = dict(data or {})
        if isinstance(data.get("sampling"), SamplingConfig):
            data["sampling"] = asdict(data["sampling"])
        data = check_field_types(cls, data, where)  # `max_tokens: "16"` is refused here, not deep in vLLM
        sampling = data.pop("sampling", None) or {}
        return cls(**data, sampling=SamplingConfig(**sampling))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "GenerateConfig":
        """Read a YAML config; ``overrides`` (None values ignored) replace fields, dicts merge (``sampling``)."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RetmaskError(f"config file {path} does not exist; see jobs/configs/ for examples") from None
        except yaml.YAMLError as err:
            raise RetmaskError(f"config file {path} is not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise RetmaskError(f"config file {path} must hold a mapping of GenerateConfig fields")
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            elif value is not None:
                data[key] = value
        return cls.from_dict(data, where=str(path))


def prompt_seed(run_seed: int, prompt_id: str) -> int:
    """Sampling seed of one prompt: stable across runs, machines and batch composition."""
    digest = hashlib.sha256(f"{run_seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------
# what the run decides, before any engine starts


def _validate(config: GenerateConfig) -> None:
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants or config.variants[0] != "normal" or len(set(config.variants)) != len(config.variants):
        raise RetmaskError(f"variants must start with 'normal' and name distinct variants from {list(VARIANTS)}, got {config.variants}")
    if config.selection not in SELECTIONS:
        raise RetmaskError(f"selection must be one of {list(SELECTIONS)}, got {config.selection!r}")
    if config.sampling.n != 1:
        raise RetmaskError("sampling.n must be 1: each variant gives one response per prompt")
    for name in ("num_actors", "tensor_parallel_size", "batch_size", "batches_in_flight"):
        if getattr(config, name) < 1:
            raise RetmaskError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not 0 < config.sampling.max_tokens < config.max_model_len:
        raise RetmaskError(f"sampling.max_tokens={config.sampling.max_tokens} must be between 1 and max_model_len={config.max_model_len}")
    if config.max_prompts is not None and config.max_prompts < 0:
        raise RetmaskError(f"max_prompts must be >= 0, got {config.max_prompts}")


def _model(config: GenerateConfig) -> tuple[str, dict]:
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
    return path, {"id": path, "path": path, "revision": Path(local).name, "hash": hash_model_dir(local), "files": local}


def _masks(config: GenerateConfig, shape) -> tuple[dict[str, list], dict]:
    """Heads gated per variant, and their manifest record (mask ids, selection rule, score digest)."""
    from retrieval_heads.masking import HeadMask
    from retrieval_heads.scores import HeadScores, select_heads

    if config.variants == ["normal"]:
        return {"normal": []}, {"normal": HeadMask.for_shape((), shape).to_dict()}
    scores = HeadScores.load(config.scores)
    scores.check_shape(shape)
    rule = {"threshold": config.threshold} if config.selection == "threshold" else {"k": config.k}
    retrieval = select_heads(scores, config.selection, **rule)
    if not retrieval:
        raise RetmaskError(f"no head in {config.scores} has a mean score >= {config.threshold}; lower threshold or use selection top_k")
    heads = {"normal": [], "retrieval_masked": retrieval}
    if "random_masked" in config.variants:
        heads["random_masked"] = select_heads(scores, "random_nonretrieval", k=len(retrieval), seed=config.seed, exclude=retrieval)
    heads = {v: heads[v] for v in config.variants}
    selection = {"retrieval_masked": {"strategy": config.selection, **rule},
                 "random_masked": {"strategy": "random_nonretrieval", "k": len(retrieval), "seed": config.seed, "exclude": "retrieval_masked"}}
    record = {}
    for v, hs in heads.items():
        record[v] = HeadMask.for_shape(hs, shape).to_dict()
        if v != "normal":
            record[v].update(selection=selection[v], scores_digest=scores.digest())
    return heads, record


def _run_config(config: GenerateConfig, model: dict, masks: dict, hf_config, tokenizer) -> dict:
    """What the manifest records; its ``IDENTITY_KEYS`` (pipeline.shards) must match on resume."""
    from pipeline.provenance import package_versions
    from retrieval_heads.errors import redact_all

    sampling = {**asdict(config.sampling), "max_model_len": config.max_model_len, "chat_template_kwargs": config.chat_template_kwargs}
    generation = {k: v for k, v in asdict(config).items() if k not in ("model", "sampling", "seed", "kill_actor_after_batches")}
    # dtype changes the numerics (hence the sampled tokens); "auto" is pinned to the checkpoint's dtype
    checkpoint = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "unknown")
    engine = {"dtype": config.engine.get("dtype", "auto"), "checkpoint_dtype": checkpoint.removeprefix("torch."),
              "max_model_len": config.max_model_len}
    template = json.dumps(tokenizer.chat_template, sort_keys=True)
    chat_template = {"sha256": hashlib.sha256(template.encode()).hexdigest(), "kwargs": config.chat_template_kwargs}
    # redacted: the output URI (and any other) may carry credentials, and the manifest is shared with the data
    return redact_all({"model": {k: v for k, v in model.items() if k != "files"}, "masks": masks, "sampling": sampling,
                       "seed": config.seed, "engine": engine, "chat_template": chat_template,
                       "scores_file": config.scores if len(masks) > 1 else None,
                       "generation": generation, "packages": package_versions()})


def _tokenizer(model_files: str, model: str):
    """The model's tokenizer; generation renders every prompt as chat, so a chat template is required."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_files)
    if not tokenizer.chat_template:
        raise RetmaskError(f"model {model} has no chat template (tokenizer_config.json or chat_template.jinja); "
                           "RetMask generates chat responses: use an instruct/chat checkpoint or add its template")
    return tokenizer


def _token_counter(tokenizer, chat_template_kwargs: dict):
    """Prompt length after the chat template, counted as ``GatedLLM.render`` does."""

    def count(text: str) -> int:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True, **chat_template_kwargs)
        return len(tokenizer.encode(rendered, add_special_tokens=False))

    return count


# ---------------------------------------------------------------------------------------------------
# the run


def generate(config: GenerateConfig) -> dict:
    """Generate (or resume) the preference shards of ``config``; returns a summary of this session."""
    from pipeline.shards import open_run
    from retrieval_heads.models import shape_of

    _validate(config)
    load_path, model = _model(config)
    files = model.get("files", load_path)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(files)
    shape = shape_of(getattr(hf_config, "text_config", hf_config))
    heads, mask_record = _masks(config, shape)
    tokenizer = _tokenizer(files, config.model)
    run_config = _run_config(config, model, mask_record, hf_config, tokenizer)
    writer = open_run(config.out, run_config, config.variants)  # refuses a different run or a second writer
    try:
        return _generate(config, writer, files, load_path, tokenizer, heads, mask_record)
    finally:
        writer.close()


def _generate(config: GenerateConfig, writer, files: str, load_path: str, tokenizer, heads: dict, mask_record: dict) -> dict:
    from pipeline import actors
    from pipeline.prompts import load_prompts, token_limit

    committed_before = len(writer.committed_ids)
    budget = None if config.max_prompts is None else max(0, config.max_prompts - committed_before)
    limit = config.max_model_len - config.sampling.max_tokens
    stream = load_prompts(config.prompts_source, config.prompts, batch_size=config.batch_size,
                          checks=[token_limit(_token_counter(tokenizer, config.chat_template_kwargs), limit)],
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
        started_ray = actors.connect(config.ray_address, num_cpus=_local_cpus(config))
        finished = False
        try:
            pool = _start_pool(config, load_path, heads)
            pool.wait_ready()
            rows, tokens, generation_seconds = _drive(config, pool, _chain(first, batches), writer, rejects, budget)
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
        "seconds": round(seconds, 1), "generation_seconds": round(generation_seconds, 1),  # the rest: engine start-up
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

    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    engine = {**config.engine, "model": load_path, "max_model_len": config.max_model_len, "seed": config.seed,
              "tensor_parallel_size": config.tensor_parallel_size, "chat_template_kwargs": config.chat_template_kwargs}
    # TP > 1: the engine's workers are Ray actors in this actor's placement group (one GPU bundle each).
    engine_kwargs = {"distributed_executor_backend": "ray"} if use_gpu and config.tensor_parallel_size > 1 else {}
    sampling = asdict(config.sampling)
    remote = ray.remote(actors.GenerationActor)
    groups: dict[int, Any] = {}

    def make(index: int):
        options = actor_options(config, index, groups, use_gpu)
        return remote.options(**options).remote(index, engine, engine_kwargs, sampling, heads)

    return actors.ActorPool(make, config.num_actors, config.batches_in_flight, config.max_retries)


def actor_options(config: GenerateConfig, index: int, groups: dict[int, Any], use_gpu: bool) -> dict[str, Any]:
    """Ray options of generation actor ``index`` (``remote.options(**...)``), placing it as its engine needs.

    Tensor parallel on GPUs: one STRICT_PACK placement group per engine, so all of an engine's GPUs are on
    one node (its shards talk over NVLink, not the network); ``groups`` keeps them by actor index so a
    replaced actor's GPUs are freed first. The group is waited for here, up to ``PLACEMENT_SECONDS``: a
    size no node can hold is a one-line error naming what was asked and what the cluster has, not a hang.
    """
    options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}  # the pool replaces failed actors
    if not use_gpu:
        options["num_cpus"] = config.num_cpus_per_actor
        # One engine per node before a second on any: a CPU engine wants a node's cores and memory
        # bandwidth, and Ray's default would pack the pool onto the driver's node. One node: no change.
        options["scheduling_strategy"] = "SPREAD"
        if config.cpu_bind:
            bind = config.cpu_bind[index % len(config.cpu_bind)]
            options["runtime_env"] = {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": bind}}
    elif config.tensor_parallel_size == 1:
        options["num_gpus"] = 1
    else:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if index in groups:  # a replaced actor's GPUs go back before its successor asks for them
            remove_placement_group(groups.pop(index))
        bundle = {"GPU": 1, "CPU": 1}
        pg = placement_group([bundle] * config.tensor_parallel_size, strategy="STRICT_PACK")
        if not pg.wait(PLACEMENT_SECONDS):
            remove_placement_group(pg)
            raise RetmaskError(_unplaceable(config.tensor_parallel_size, bundle, index))
        groups[index] = pg
        options.update(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True))
    return options


def _unplaceable(tp: int, bundle: dict[str, float], index: int) -> str:
    """Why engine ``index`` found no node: what one engine asks for, each node's resources, what is free."""
    import ray

    def amounts(resources: dict) -> str:
        return ", ".join(f"{key} {resources.get(key, 0):g}" for key in bundle)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    listed = "; ".join(f"node {n['NodeID'][:8]} ({n.get('NodeManagerAddress')}): {amounts(n.get('Resources', {}))}"
                       for n in nodes[:8]) + (f"; {len(nodes) - 8} more" if len(nodes) > 8 else "")
    asked = ", ".join(f"{key} {value * tp:g}" for key, value in bundle.items())
    return (f"cannot place engine {index} of tensor_parallel_size={tp}: it needs {asked} on one node, and none had "
            f"them free within {PLACEMENT_SECONDS:g} s (nodes: {listed or 'none'}; free in the cluster now: "
            f"{amounts(ray.available_resources())}); lower tensor_parallel_size or num_actors, or add nodes with "
            f"{tp} GPUs each")


def _drive(config: GenerateConfig, pool, batches, writer, rejects: "_Rejects", budget: int | None) -> tuple[int, int, float]:
    from tqdm import tqdm

    rows = tokens = commits = 0
    start = time.perf_counter()
    with tqdm(total=budget, unit="prompt", desc="generate", dynamic_ncols=True) as bar:
        for batch, table, stats in pool.map_unordered(batches):
            if table.num_rows:  # a batch of poison prompts only leaves rejects, no shard
                writer.write_shard(table)  # the driver is the only writer of the manifest
                rows, tokens, commits = rows + table.num_rows, tokens + stats["tokens"], commits + 1
            texts = {pid: text for pid, text, _ in batch}
            for pid, reason in stats.get("rejects", ()):  # prompts the engine failed on (pipeline.actors)
                rejects.add(pid, texts[pid], reason)
            elapsed = time.perf_counter() - start
            bar.update(len(batch))
            bar.set_postfix(tokens_per_s=f"{tokens / elapsed:.0f}", shards=len(writer.manifest["shards"]))
            rejects.flush(None)
            if table.num_rows and commits == config.kill_actor_after_batches:
                pool.crash_one()
    return rows, tokens, time.perf_counter() - start


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _limited(stream, budget: int | None, rejects: "_Rejects", seed: int) -> Iterator[list[tuple[str, str, int]]]:
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
        from pipeline.prompts import Prompt, Reject

        self.stream._reject(Reject(Prompt(prompt_id, text), reason))
        self.note(self.stream)  # under strict, an engine reject stops the run like a bad row

    def flush(self, stream) -> None:
        from pipeline import shards

        stream = stream or self.stream
        if stream is None or len(stream.rejects) == self.written:
            return
        lines = [json.dumps({"reason": r.reason, "kind": r.kind, **_row(r.row)}, default=str) for r in stream.rejects]
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
