"""The head gate inside vLLM's workers: installed while the weights load, switched in place by RPC.

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

The driver side (``pipeline.engine.GatedLLM``) names this module's loader and extension when it builds
the engine; nothing else imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.model_executor.model_loader import BaseModelLoader, get_model_loader, register_model_loader

from pipeline.placement import check_tensor_parallel, local_heads
from retrieval_heads.errors import RetmaskError
from retrieval_heads.masking import SUPPORTED_ARCHITECTURES, channel_gate, output_projections
from retrieval_heads.models import ModelShape, shape_of
from retrieval_heads.scores import Head

GATE_LOAD_FORMAT = "retmask_gated"
GATE_EXTENSION = f"{__name__}.HeadGateExtension"
GATE_VERSION = 1  # bump when the traced gate changes, so stale compiled graphs are not reused


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
        raise RetmaskError(f"found {len(projections)} o_proj layers, expected {shape.num_layers}; "
                           "pipeline parallel is not supported")
    for proj in projections:
        got = getattr(proj, "input_size_per_partition", width)
        if got != width:
            raise RetmaskError(f"o_proj takes {got} input channels on rank {rank}, expected {width}; "
                               f"supported: {SUPPORTED_ARCHITECTURES}")
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
        return {"rank": gates.rank, "tp_size": gates.tp_size, "masked_local": masked, "data_ptrs": ptrs,
                "ones": ones}


def _require_gates() -> _WorkerGates:
    if _WORKER_GATES is None:
        raise RuntimeError("no head gate in this worker: the engine must be built with "
                           f"load_format={GATE_LOAD_FORMAT!r}")
    return _WORKER_GATES
