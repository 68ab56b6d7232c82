"""The head gate's tensors and hook, vLLM-free: what ``pipeline.gate`` installs in every ``o_proj``.

Apart from the vLLM side (loader, worker extension, model-runner hook in ``pipeline.gate``) so that the
arithmetic that runs inside compiled graphs and CUDA graphs can be exercised on any torch model, e.g. on a
GPU machine without vLLM (``bench/gpu_check.py``).

- Each ``o_proj`` holds a fixed ``[MAX_MASKS, width]`` gate table (width: this rank's
  ``num_heads/tp * head_dim`` input channels). Row 0 is the engine-wide gate (``retmask_gate`` is a view
  of it); rows 1.. are per-request masks.
- All layers share one per-token slot index (``StepSlots.index``, ``[max_tokens]`` int64): the hook
  multiplies token ``t`` by ``table[index[t]]``. Tokens of untagged requests and padding read row 0.
- Every tensor keeps its address for the engine's life and is written in place (``copy_``), because traced
  graphs and CUDA graphs hold addresses, not Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.placement import MAX_MASKS, check_tensor_parallel, local_heads
from retrieval_heads.errors import RetmaskError
from retrieval_heads.masking import SUPPORTED_ARCHITECTURES, channel_gate, output_projections
from retrieval_heads.models import ModelShape
from retrieval_heads.scores import Head


@dataclass
class StepSlots:
    """The per-token mask slots of the current model step, shared by every layer of one worker."""

    index: torch.Tensor  # [max_tokens] int64 on the model's device; fixed address
    mixed: bool = False  # some token of this step reads a row other than 0 (eager layers check it)
    filled: int = 0  # leading entries of ``index`` that may be non-zero
    staging: torch.Tensor | None = None  # pinned host copy of ``index`` when it lives on a GPU

    def fill(self, rows: Sequence[int], tokens_per_row: Sequence[int]) -> None:
        """Point the next step's tokens at their requests' table rows; token order is each request's tokens
        in turn (``rows[i]`` repeated ``tokens_per_row[i]`` times), as vLLM lays out a step.

        On a GPU the index is copied from pinned memory without blocking: the caller must not fill again
        before the step that reads this fill has been queued (vLLM's input preparation guarantees it)."""
        on_host = self.index.device.type == "cpu"
        if self.staging is None:
            self.staging = self.index if on_host else torch.zeros_like(self.index, device="cpu").pin_memory()
        host = self.staging.numpy()
        total = int(np.sum(tokens_per_row))
        if any(rows):
            host[:total] = np.repeat(np.asarray(rows, dtype=np.int64), np.asarray(tokens_per_row))
            end = max(total, self.filled)
            host[total:end] = 0  # padding tokens (and the rest of the last step) read row 0
            if not on_host:
                self.index[:end].copy_(self.staging[:end], non_blocking=True)
            self.filled, self.mixed = total, True
        elif self.filled:
            self.index[: self.filled].zero_()
            if not on_host:
                self.staging[: self.filled].zero_()
            self.filled, self.mixed = 0, False


def gate_input(module, args):
    """The forward pre-hook on ``o_proj``: its input times each token's gate row."""
    # Traced graphs always gather (a Python flag would be frozen into them); eager runs gather only in steps
    # holding a per-request mask and otherwise skip layers without masked heads, so the plain model pays
    # only two flag checks per layer.
    x = args[0]
    if torch.compiler.is_compiling() or module.retmask_slots.mixed:
        return (x * module.retmask_table[module.retmask_index[: x.shape[0]]], *args[1:])
    if module.retmask_active:
        return (x * module.retmask_gate, *args[1:])
    return None


def install_gates(model, shape: ModelShape, tp_size: int, rank: int, dtype, device, max_tokens: int) -> list:
    """Give each layer's ``o_proj`` an all-ones gate table, the shared slot index and the hook applying them;
    return the projections (``max_tokens``: the most tokens one model step holds)."""
    width = check_tensor_parallel(shape, tp_size) * shape.head_dim
    slots = StepSlots(torch.zeros(max_tokens, dtype=torch.int64, device=device))
    projections = output_projections(model)
    if len(projections) != shape.num_layers:
        raise RetmaskError(f"found {len(projections)} o_proj layers, expected {shape.num_layers}; "
                           "pipeline parallel is not supported")
    for proj in projections:
        got = getattr(proj, "input_size_per_partition", width)
        if got != width:
            raise RetmaskError(f"o_proj takes {got} input channels on rank {rank}, expected {width}; "
                               f"supported: {SUPPORTED_ARCHITECTURES}")
        table = torch.ones(MAX_MASKS, width, dtype=dtype, device=device)
        proj.register_buffer("retmask_table", table, persistent=False)
        proj.register_buffer("retmask_gate", table[0], persistent=False)  # a view: the engine-wide row
        proj.register_buffer("retmask_index", slots.index, persistent=False)  # one tensor, every layer
        proj.retmask_slots = slots
        proj.retmask_active = False
        proj.register_forward_pre_hook(gate_input)
    return projections


def fill_row(projections: list, shape: ModelShape, tp_size: int, rank: int, row: int, heads: list[Head]) -> int:
    """Write mask ``heads`` (global (layer, head)) into table row ``row`` of every layer, in place; return how
    many of the heads this rank holds. Row 0 also sets each layer's eager skip flag."""
    mine = local_heads(heads, shape, tp_size, rank)
    per_rank = shape.num_heads // tp_size
    for layer, proj in enumerate(projections):
        new = channel_gate(mine.get(layer, ()), per_rank, shape.head_dim, dtype=proj.retmask_table.dtype)
        proj.retmask_table[row].copy_(new)  # in place: traced graphs and CUDA graphs keep this address
        if row == 0:
            proj.retmask_active = not bool(proj.retmask_gate.eq(1).all())
    return sum(len(h) for h in mine.values())
