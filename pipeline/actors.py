"""Ray actors that each own one gated vLLM engine, and the pool that feeds them prompt batches.

Why an actor pool and not Ray Data ``map_batches``: the output contract needs one writer per directory
committing one shard per finished batch (``pipeline.shards``), resume by prompt id, and rejects counted
against a single-pass ``PromptStream``. Ray Data would own batching, ordering and retries and
materialize its own blocks; here the driver keeps those decisions and still gets what Ray gives:
scheduling (GPUs, placement groups), the object store and process isolation.

Failure handling: a failed batch (actor process died, node lost, or an engine that no longer works) is
re-queued and its actor replaced by a fresh one (the old one is killed, so an engine in an unknown state
never sees another batch). A batch is committed only from a successful result, so nothing is lost or
written twice; a batch that fails ``max_retries + 1`` times stops the run.

Poison prompts: a prompt that makes a healthy engine raise would fail its batch on every retry and stop
every rerun at the same place. ``GenerationActor.generate`` therefore bisects a batch whose engine call
raises until the failing prompt is alone, and returns it as a reject (``engine_error: ...``) next to the
rows of the others. The bisection runs inside the actor, not in the driver's pool, because the actor is
the one that can tell "this prompt" from "this engine": after an error it checks that the engine is still
usable (not ``EngineDeadError``, no request left behind, a one-token probe under every mask passes) and
otherwise re-raises, so the pool replaces it exactly as for a dead process instead of rejecting every
prompt. It also costs no engine reload, no re-scheduling and no object transfer per half, and keeps the
pool's contract: one task in, one shard (and its rejects) out.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayError

from pipeline.engine import EngineConfig
from retrieval_heads.errors import RetmaskError

log = logging.getLogger(__name__)

PromptItem = tuple[str, str, int]  # (prompt id, text, seed)


class GenerationActor:
    """Owns one ``GatedLLM``; turns a batch of prompts into one Arrow row per prompt holding every variant."""

    def __init__(self, index: int, engine: EngineConfig, engine_kwargs: dict, sampling: dict,
                 masks: dict[str, list], mixed: bool = True):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        # Ray forwards every actor's output to the driver's terminal; vLLM's per-engine INFO lines would
        # bury the progress bar. Export VLLM_LOGGING_LEVEL=INFO to see them (read when vLLM is imported).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # vLLM is imported here, never in the driver: the driver stays a light process.
        from vllm import SamplingParams
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # In-process engine core: on CPU the separate core process only adds a busy-polling process
            # competing for the cores and ~20 s of start-up; GPUs keep vLLM's default (overlap).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from pipeline.engine import GatedLLM
        from pipeline.shard_schema import schema_for
        from retrieval_heads.masking import HeadMask

        self.index, self.batches, self.mixed = index, 0, mixed
        self.llm = GatedLLM.from_config(engine, **engine_kwargs)
        self.sampling = SamplingParams(**sampling)
        self.masks = {v: HeadMask.for_shape(heads, self.llm.shape) if heads else None for v, heads in masks.items()}
        self.schema = schema_for(list(masks))
        self._one_token = SamplingParams(max_tokens=1)
        # One token through every mask now, so "ready" means first-batch speed (lazy allocations, first
        # gate switch) and the first batch is not slower than the rest.
        self._probe()

    def info(self) -> dict:
        """Where this actor runs (pid, node) and what its engine accepts."""
        return {"index": self.index, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "max_model_len": self.llm.config.max_model_len}

    def generate(self, batch: list[PromptItem]) -> tuple[pa.Table, dict]:
        """Every variant for every prompt of the batch: one continuous batch of prompts x variants, each request
        under its own mask (``mixed``), or one engine call per variant with the mask switched engine-wide.

        ``stats["rejects"]`` lists ``(prompt id, reason)`` of the prompts the engine refused; they have no row.
        """
        from pipeline.shard_schema import make_row

        start = time.perf_counter()
        kept, outputs, refused = self._outputs(batch)
        rows, tokens = [], 0
        for i, (pid, text, seed) in enumerate(kept):
            per_variant = {v: (out[i].text, out[i].num_completion_tokens, out[i].finish_reason)
                           for v, out in outputs.items()}
            tokens += sum(out[i].num_completion_tokens for out in outputs.values())
            rows.append(make_row(pid, text, seed, next(iter(outputs.values()))[i].num_prompt_tokens, per_variant))
        seconds = time.perf_counter() - start
        self.batches += 1
        log.info("actor %d: batch %d, %d prompts x %d variants, %d tokens in %.1f s (%.0f tokens/s)",
                 self.index, self.batches, len(kept), len(self.masks), tokens, seconds, tokens / max(seconds, 1e-9))
        stats = {"tokens": tokens, "seconds": seconds, "rejects": refused}
        return pa.Table.from_pylist(rows, schema=self.schema), stats

    def _outputs(self, batch: list[PromptItem]) -> tuple[list[PromptItem], dict[str, list], list[tuple[str, str]]]:
        """(prompts kept, their completions per variant, refused prompts): halves a failing batch until the
        prompt that makes the engine raise is alone."""
        try:
            return batch, self._engine_call(batch), []
        except RetmaskError:
            raise  # a user error (settings, mask) holds for every prompt: the pool stops the run
        except Exception as err:  # vLLM raises many types for one bad input
            self._check_engine(err)
            if len(batch) == 1:
                log.warning("actor %d: the engine failed on prompt %s (%s); it goes to rejects", self.index,
                            batch[0][0], _error_line(err))
                return [], {v: [] for v in self.masks}, [(batch[0][0], f"engine_error: {_error_line(err)}")]
        half = len(batch) // 2
        parts = [self._outputs(batch[:half]), self._outputs(batch[half:])]
        return ([item for kept, _, _ in parts for item in kept],
                {v: [c for _, outputs, _ in parts for c in outputs[v]] for v in self.masks},
                [r for _, _, refused in parts for r in refused])

    def _engine_call(self, batch: list[PromptItem]) -> dict[str, list]:
        _, texts, seeds = zip(*batch)
        poison = os.environ.get("RETMASK_FAULT_POISON")  # fault injection (tests): a prompt the engine raises on
        if poison and any(poison in text for text in texts):
            raise ValueError("injected poison prompt")
        # The same per-prompt seed under every variant: a pair differs by the mask, not by the dice.
        if not self.mixed:
            return {v: self.llm.generate(list(texts), self.sampling, mask=mask, seeds=list(seeds))
                    for v, mask in self.masks.items()}
        variants = list(self.masks)
        out = self.llm.generate_mixed([t for t in texts for _ in variants], self.sampling,
                                      masks=[self.masks[v] for _ in texts for v in variants],
                                      seeds=[s for s in seeds for _ in variants])
        return {v: out[i::len(variants)] for i, v in enumerate(variants)}

    def _check_engine(self, err: Exception) -> None:
        """Re-raise ``err`` unless the engine still works: a broken engine would turn every prompt into a reject."""
        # By name: vLLM has moved its exception classes between releases (vllm.v1.engine.exceptions today).
        dead = any(cls.__name__ == "EngineDeadError" for cls in type(err).__mro__)
        # Requests left inside the engine (an error mid-step) would come back in the next call's outputs.
        if dead or self.llm.llm.llm_engine.has_unfinished_requests():
            raise err
        try:
            self._probe()
        except Exception:
            log.warning("actor %d: the engine no longer works after %s", self.index, _error_line(err))
            raise err from None

    def _probe(self) -> None:
        for mask in self.masks.values():
            self.llm.generate(["Hi"], self._one_token, mask=mask)

    def close(self) -> None:
        """Stop the engine's processes before the actor goes away."""
        self.llm.close()


# ---------------------------------------------------------------------------------------------------
# driver side


@dataclass
class _Task:
    batch: list[PromptItem]
    attempts: int = 0


def user_error(err: BaseException) -> str | None:
    """The one-line RetmaskError message inside a Ray error, if the remote side raised one."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, RetmaskError):
        return str(cause)
    found = re.search(r"RetmaskError: (.+)", str(err))
    return found.group(1).strip() if found else None


class ActorPool:
    """``num_actors`` generation actors, each with at most ``per_actor`` batches queued or running."""

    def __init__(self, make_actor: Callable[[int], Any], num_actors: int, per_actor: int, max_retries: int):
        self._make, self.per_actor, self.max_retries = make_actor, per_actor, max_retries
        self.actors = [make_actor(i) for i in range(num_actors)]
        self._generation = [0] * num_actors  # bumps when a slot's actor is replaced
        self._pending: dict[ray.ObjectRef, tuple[int, int, _Task]] = {}
        self.replacements = 0
        self.info: dict[int, dict] = {}

    def wait_ready(self) -> list[dict]:
        """Block until every engine is loaded; a failure to start is a user error, not a retry."""
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except RayError as err:
            raise RetmaskError(f"a generation actor failed to start: {user_error(err) or _first_line(err)}") from None
        self.info = {i["index"]: i for i in infos}
        for i in infos:
            log.info("actor %d ready: pid %d on node %s", i["index"], i["pid"], i["node"][:12])
        return infos

    def map_unordered(self, batches: Iterable[list[PromptItem]]) -> Iterator[tuple[list[PromptItem], pa.Table, dict]]:
        """Yield ``(batch, table, stats)`` as batches finish; the source is read only as actors free up."""
        source, retry = iter(batches), deque()
        exhausted = False
        while True:
            exhausted = self._fill(source, retry, exhausted)
            if not self._pending:
                return
            [ref], _ = ray.wait(list(self._pending), num_returns=1)
            slot, generation, task = self._pending.pop(ref)
            try:
                table, stats = ray.get(ref)
            except RayError as err:
                self._failed(slot, generation, task, err, retry)
                continue
            yield task.batch, table, stats

    def _fill(self, source: Iterator, retry: deque, exhausted: bool) -> bool:
        load = [0] * len(self.actors)
        for slot, _, _ in self._pending.values():
            load[slot] += 1
        for slot in sorted(range(len(self.actors)), key=load.__getitem__):
            while load[slot] < self.per_actor:
                if retry:
                    task = retry.popleft()
                elif not exhausted:
                    batch = next(source, None)
                    if batch is None:
                        exhausted = True
                        continue
                    task = _Task(batch)
                else:
                    return exhausted
                ref = self.actors[slot].generate.remote(task.batch)
                self._pending[ref] = (slot, self._generation[slot], task)
                load[slot] += 1
        return exhausted

    def _failed(self, slot: int, generation: int, task: _Task, err: RayError, retry: deque) -> None:
        message = user_error(err)
        if message and not isinstance(err, RayActorError):
            raise RetmaskError(message)
        task.attempts += 1
        ids = [pid for pid, _, _ in task.batch]
        if task.attempts > self.max_retries:
            raise RetmaskError(
                f"a batch of {len(ids)} prompts (first id {ids[0]}) failed {task.attempts} times, last: "
                f"{_first_line(err)}; committed shards are intact, rerun to resume"
            )
        kind = "actor died" if isinstance(err, RayActorError) else "engine error"
        log.warning("actor %d: %s (%s); re-queueing %d prompts (attempt %d)", slot, kind, _first_line(err),
                    len(ids), task.attempts + 1)
        retry.append(task)
        if generation == self._generation[slot]:  # the first failure seen from this actor: replace it once
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self._make(slot)
            self._generation[slot] += 1
            self.replacements += 1
            self.info.pop(slot, None)

    def crash_one(self) -> None:
        """Fault injection for tests: SIGKILL a busy actor's process, as the OOM killer would."""
        slot = next((s for s, _, _ in self._pending.values()), 0)
        info = self.info.get(slot) or ray.get(self.actors[slot].info.remote())
        if info["node"] == ray.get_runtime_context().get_node_id():
            log.warning("fault injection: SIGKILL actor %d (pid %d)", slot, info["pid"])
            os.kill(info["pid"], signal.SIGKILL)
        else:
            ray.kill(self.actors[slot], no_restart=True)

    def close(self, graceful: bool = True, timeout: float = 60.0) -> None:
        """Shut every engine down (``graceful``: after the batches queued on it), then remove the actors.

        A killed actor's engine processes exit on their own: vLLM's engine core watches its parent.
        """
        if graceful:
            refs = [a.close.remote() for a in self.actors]
            _, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            if waiting:
                log.warning("%d engines did not close within %.0f s; killing their actors", len(waiting), timeout)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _error_line(err: BaseException) -> str:
    """``Type: first line of the message``, as the last line of a traceback reads."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__
