"""The head gate inside vLLM's workers: installed while the weights load, switched in place by RPC.

RetMask zeroes the masked heads' input columns of ``o_proj`` in a copy of the checkpoint and serves it
with a second server (docs/METHOD.md pitfall 9). Here the same zeros come from a gate inside one engine:

- A model loader (``load_format="retmask_gated"``, wrapping vLLM's default loader) gives every decoder
  layer's ``o_proj`` the gate tables of ``pipeline.gate_tables`` (0/1 rows over this rank's
  ``num_heads/tp * head_dim`` input channels) and the forward pre-hook multiplying the input by them. It
  runs right after the weights load, so the hook is in place before vLLM traces the model (torch.compile)
  and captures CUDA graphs.
- A worker extension (``HeadGateExtension``) switches the mask with one ``collective_rpc`` per engine: it
  maps global (layer, head) to this rank's local heads and ``copy_``s the new gates into the same
  buffers, so compiled graphs and CUDA graphs (which hold the buffers' addresses) see the new mask.
  Importing this module in the worker (vLLM resolves the extension class first) registers the loader.
- Eager runs skip the multiply in layers without masked heads; traced graphs always contain it.
- Per-request masks (the tables' rows 1.., see ``pipeline.gate_tables``) are filled by
  ``retmask_register_mask``. Once a mask is registered, the model runner's ``_prepare_inputs`` is wrapped
  (on this runner instance) to fill the per-token slot index from each request's
  ``SamplingParams.extra_args["retmask_mask"]`` before every step.

The driver side (``pipeline.engine.GatedLLM``) names this module's loader and extension when it builds
the engine; nothing else imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.model_executor.model_loader import BaseModelLoader, get_model_loader, register_model_loader

from pipeline.gate_tables import StepSlots, fill_row, install_gates
from pipeline.placement import MAX_MASKS
from retrieval_heads.models import ModelShape, shape_of
from retrieval_heads.scores import Head

GATE_LOAD_FORMAT = "retmask_gated"
GATE_EXTENSION = f"{__name__}.HeadGateExtension"
GATE_VERSION = 2  # bump when the traced gate changes, so stale compiled graphs are not reused
MASK_ARG = "retmask_mask"  # SamplingParams.extra_args key holding a request's mask slot


@dataclass
class _WorkerGates:
    projections: list
    shape: ModelShape
    tp_size: int
    rank: int
    slots: StepSlots
    runner_wrapped: bool = False


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
            max_tokens = vllm_config.scheduler_config.max_num_batched_tokens  # the runner's max_num_tokens
            projections = install_gates(model, shape, tp_size, rank, model_config.dtype, device, max_tokens)
            _WORKER_GATES = _WorkerGates(projections, shape, tp_size, rank, projections[0].retmask_slots)
        return model


class HeadGateExtension:
    """vLLM worker extension: ``collective_rpc`` methods that switch and report the head gate."""

    def retmask_set_heads(self, heads: list[Head]) -> int:
        """Gate exactly ``heads`` (global (layer, head)) engine-wide; return how many of them this rank holds."""
        gates = _require_gates()
        return fill_row(gates.projections, gates.shape, gates.tp_size, gates.rank, 0, heads)

    def retmask_register_mask(self, slot: int, heads: list[Head]) -> int:
        """Fill per-request mask ``slot`` (1..MAX_MASKS-1) with ``heads``; return how many this rank holds.

        The first registration wraps the model runner so that each step reads its requests' slots."""
        if not 0 < slot < MAX_MASKS:
            raise ValueError(f"mask slot {slot} out of range 1..{MAX_MASKS - 1} (slot 0 is the engine-wide gate)")
        gates = _require_gates()
        if not gates.runner_wrapped:
            _wrap_prepare_inputs(self.model_runner, gates.slots)
            gates.runner_wrapped = True
        return fill_row(gates.projections, gates.shape, gates.tp_size, gates.rank, slot, heads)

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
        return {"rank": gates.rank, "tp_size": gates.tp_size, "masked_local": masked, "data_ptrs": ptrs,
                "ones": ones}


def _wrap_prepare_inputs(runner, slots: StepSlots) -> None:
    """Make ``runner._prepare_inputs`` fill ``slots`` from the batch before the model step it prepares.

    vLLM 0.32's V1 ``GPUModelRunner`` (and ``CPUModelRunner``, its subclass) prepares every step's inputs
    there, with ``input_batch.req_ids[row]`` and ``num_scheduled_tokens[row]`` in batch-row order; the
    token order of a step is ``np.repeat(rows, num_scheduled_tokens)``. Patched on the instance, so only a
    gated engine's runner changes. It runs inside the runner's ``synchronize_input_prep``, which (with async
    scheduling) waits until the previous step's host-to-device copies are done, so the pinned staging copy
    that ``StepSlots.fill`` writes is free.
    """
    prepare = getattr(runner, "_prepare_inputs", None)
    if prepare is None or not hasattr(runner, "input_batch") or not hasattr(runner, "requests"):
        raise RuntimeError(f"per-request head masks need vLLM's V1 GPUModelRunner; got {type(runner).__name__} "
                           "(unset VLLM_USE_V2_MODEL_RUNNER)")

    def prepare_with_slots(scheduler_output, num_scheduled_tokens, *args, **kwargs):
        slots.fill([_request_slot(runner.requests[req_id]) for req_id in runner.input_batch.req_ids],
                   num_scheduled_tokens)
        return prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)

    runner._prepare_inputs = prepare_with_slots


def _request_slot(state) -> int:
    extra = getattr(state.sampling_params, "extra_args", None) or {}
    slot = extra.get(MASK_ARG, 0)
    if not (isinstance(slot, int) and 0 <= slot < MAX_MASKS):
        raise ValueError(f"request {state.req_id}: extra_args[{MASK_ARG!r}]={slot!r} is not a mask slot "
                         f"0..{MAX_MASKS - 1}")
    return slot


def _require_gates() -> _WorkerGates:
    if _WORKER_GATES is None:
        raise RuntimeError("no head gate in this worker: the engine must be built with "
                           f"load_format={GATE_LOAD_FORMAT!r}")
    return _WORKER_GATES


def register_plugin() -> None:
    """vLLM general plugin (entry point ``retmask_gate`` in ``vllm.general_plugins``, pyproject.toml).

    vLLM calls it in every process it starts (API server, engine core, workers), so ``load_format=
    "retmask_gated"`` resolves in all of them, also under a plain ``vllm serve``. Importing this module has
    already registered the loader; nothing else happens here, so the plugin is harmless in any vLLM process
    (an ungated engine never looks the loader up).
    """
