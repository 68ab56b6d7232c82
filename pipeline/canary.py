"""The gate canary: proof that the head gate acts inside the graphs that actually run.

A gate missing from a compiled graph or a CUDA graph would silently turn every ablated answer into the
plain one: the buffers switch, the logits do not. So ``GatedLLM`` (``pipeline.engine``) runs this check at
engine start and once for each new mask, and refuses to generate when it fails. A probe is one short
prompt, greedy, two tokens, with the top-k logprobs of each compared bit for bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from retrieval_heads.errors import RetmaskError
from retrieval_heads.scores import Head

log = logging.getLogger(__name__)

# The canary's probe: plain text (no chat template, so every tokenizer gives a short prompt) with a fact to
# retrieve, so attention heads have context to act on, and a near-certain greedy continuation (" blue box").
CANARY_TEXT = (
    "Alice keeps the red key in the blue box. Bob keeps the green key in the white box. "
    "Question: where does Alice keep the red key? Answer: in the"
)
CANARY_TOPK = 20  # top-k logprobs compared per generated token (vLLM's default max_logprobs)


@dataclass(frozen=True)
class Probe:
    """The canary prompt's greedy tokens and, per generated token, its top-k (token id, logprob.hex())."""

    tokens: tuple[int, ...]
    steps: tuple[tuple[tuple[int, str], ...], ...]  # hex: compared bit for bit, and NaN equals NaN


class GateCanary:
    """Probes one engine's gate; ``proven`` maps each mask it proved to the seconds its probe took.

    ``switch(heads)`` installs a mask on every worker without any check, ``report()`` reads each
    worker's gate buffers back (``HeadGateExtension.retmask_gate_report``).
    """

    def __init__(self, llm, switch: Callable[[tuple[Head, ...]], None], report: Callable[[], list[dict]],
                 num_layers: int):
        self.llm, self.switch, self.report, self.num_layers = llm, switch, report, num_layers
        self.reference: Probe | None = None  # the plain model's probe; set by check_start
        self.proven: dict[tuple[Head, ...], float] = {}
        self._probes = 0

    def check_start(self) -> None:
        """The check at engine start: the gate changes prefill and decode logits, and undoes itself.

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
        plain model. Raises ``RetmaskError`` on any failure.
        """
        started = time.perf_counter()
        self.proven = {}  # a failed start check leaves no mask proven
        self.switch(())
        bad = [r["rank"] for r in self.report() if not r["ones"]]
        if bad:
            raise RetmaskError(f"the head gate is not all ones under the empty mask on rank(s) {bad} (gate canary); "
                               "this is a bug: report it")
        reference = self.probe()
        canary = ((self.num_layers - 1, 0),)
        self.switch(canary)
        if self.check_mask(canary, reference).tokens[0] != reference.tokens[0]:
            log.warning("gate canary: mask %s changed the first greedy token, so the decode check is not isolated "
                        "from the prefill", mask_label(canary))
        self.switch(())
        probe_started = time.perf_counter()
        if self.probe() != reference:
            raise RetmaskError("the empty mask does not reproduce the plain model's logits after a mask switch "
                               "(gate canary): the gate buffers are not restored; rerun with enforce_eager=True "
                               "and report it")
        self.proven[()] = time.perf_counter() - probe_started
        self.reference = reference
        log.info("gate canary passed at engine start in %.2f s (prefill and decode logits change under mask %s; "
                 "the empty mask reproduces the plain model)", time.perf_counter() - started, mask_label(canary))

    def check_mask(self, heads: tuple[Head, ...], reference: Probe | None = None) -> Probe:
        """Probe the installed non-empty mask: its first token's and a decode step's logits must differ."""
        reference = reference or self.reference
        started = time.perf_counter()
        probe = self.probe()
        for step, where in ((0, "prefill"), (1, "decode")):
            if probe.steps[step] == reference.steps[step]:
                raise RetmaskError(
                    f"the head gate has no effect on the {where} logits under mask {mask_label(heads)} "
                    "(gate canary): the compiled graph may not contain the gate; rerun with enforce_eager=True "
                    "and report it"
                )
        self.proven[heads] = seconds = time.perf_counter() - started
        log.info("gate canary: mask %s changes the prefill and decode logits (%.3f s)", mask_label(heads), seconds)
        return probe

    def check_slots(self, slots: dict[tuple[Head, ...], int], mask_arg: str) -> None:
        """Probe per-request masks: in one batch with a plain request, each request tagged with a mask's slot
        must get prefill and decode logits other than the plain request's. A per-token slot index that the
        running graph does not read (every token on row 0) would make them equal. Logits are compared within
        the batch, not with the switched probes: a different batch may round differently."""
        started = time.perf_counter()
        order = sorted(slots.items(), key=lambda item: item[1])
        plain, *tagged = self.probe([{}] + [{mask_arg: slot} for _, slot in order])
        for (heads, slot), probe in zip(order, tagged):
            for step, where in ((0, "prefill"), (1, "decode")):
                if probe.steps[step] == plain.steps[step]:
                    raise RetmaskError(
                        f"mask {mask_label(heads)} has no effect on the {where} logits as a per-request mask (slot "
                        f"{slot}, gate canary): the graph may not read the per-token slot index; use batching: "
                        "switched and report it"
                    )
        log.info("gate canary: %d per-request mask(s) change the prefill and decode logits (%.3f s)", len(order),
                 time.perf_counter() - started)

    def probe(self, extra_args: Sequence[dict] | None = None) -> Probe | list[Probe]:
        """The canary prompt under the installed mask: greedy, 2 tokens, top-k logprobs of each. With
        ``extra_args``, one probe per entry (a request's ``SamplingParams.extra_args``), all in one batch."""
        from vllm import SamplingParams

        tokenizer = self.llm.get_tokenizer()
        cap = self.llm.llm_engine.model_config.max_logprobs
        top_k = CANARY_TOPK if cap < 0 else min(CANARY_TOPK, cap)
        items, params = [], []
        for extra in extra_args if extra_args is not None else [{}]:
            self._probes += 1
            params.append(SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=top_k,
                                         detokenize=False, extra_args=extra or None))
            # A salt per probe: a prefix-cache hit (blocks of the plain model, of another mask or of an earlier
            # probe) would skip computing the prompt under the gate being tested.
            items.append({"prompt_token_ids": tokenizer.encode(CANARY_TEXT),
                          "cache_salt": f"retmask-canary-{self._probes}"})
        probes = []
        for result in self.llm.generate(items, params, use_tqdm=False):
            out = result.outputs[0]
            steps = tuple(tuple(sorted((t, lp.logprob.hex()) for t, lp in step.items())) for step in out.logprobs)
            probes.append(Probe(tuple(out.token_ids), steps))
        return probes if extra_args is not None else probes[0]


def mask_label(heads: Sequence[Head]) -> str:
    """A mask as ``17-3,18-6,...``, at most four heads shown."""
    shown = ",".join(f"{l}-{h}" for l, h in heads[:4])
    return shown if len(heads) <= 4 else f"{shown},... ({len(heads)} heads)"
