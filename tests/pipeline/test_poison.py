"""A prompt the engine raises on (a poison prompt) is isolated: it goes to rejects.jsonl, the run goes on.

The poison is injected by ``RETMASK_FAULT_POISON``: the actor's engine call raises on any batch holding a
prompt that contains the substring, as a real engine exception would. Actors started by a local Ray inherit
the driver's environment, so the variable set on the CLI process reaches them.
"""

import json
from types import SimpleNamespace

import pytest
from support import (
    child_env,
    data_files,
    job_summary,
    prompt_rows,
    retmask,
    write_config,
    write_prompts,
    write_scores,
    written_ids,
)

from pipeline.inspect import inspect_run
from pipeline.shards import read_manifest

MARKER = "zq-poison-7f3a"


@pytest.mark.slow
def test_poison_prompt_becomes_a_reject_and_the_run_goes_on(tmp_path, embedded_model_path):
    rows = prompt_rows(8)  # two batches of 4; the poison shares its batch with three good prompts
    rows[5]["prompt"] += f" {MARKER}"
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", prompts=str(write_prompts(tmp_path / "p.jsonl", rows)),
                          scores=str(write_scores(tmp_path / "s.json")), out=str(out), max_retries=1)
    result = retmask("--config", str(config), module="jobs.generate", env=child_env(RETMASK_FAULT_POISON=MARKER))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = job_summary(result.stdout)
    assert summary["rows_written"] == 7 and summary["rejected"] == {"engine_error": 1}
    assert summary["actor_replacements"] == 0  # bisected inside the live actor: no engine reload
    assert "the engine failed on prompt p05" in result.stderr

    good = sorted(r["id"] for r in rows if r["id"] != "p05")
    assert written_ids(out) == good  # each exactly once
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["prompt_id"] == "p05" and rejects[0]["kind"] == "engine_error"
    assert rejects[0]["reason"] == "engine_error: ValueError: injected poison prompt"
    assert MARKER in rejects[0]["row"]["text"]
    assert data_files(out) == sorted(s["file"] for s in read_manifest(out)["shards"]) and len(data_files(out)) == 2
    assert inspect_run(out)["problems"] == []


# ---------------------------------------------------------------------------------------------------
# the actor's bisection, with a stand-in engine (no model: milliseconds)


class FakeEngine:
    """Raises on any call holding a prompt with "bad" in it; ``broken`` fails every call after the first error."""

    def __init__(self, broken=False, leftover=False):
        self.calls, self.broken, self.failed = [], broken, False
        self.llm = SimpleNamespace(llm_engine=SimpleNamespace(has_unfinished_requests=lambda: leftover and self.failed))

    def generate(self, prompts, sampling, mask=None, seeds=None):
        self.calls.append(list(prompts))
        if any("bad" in p for p in prompts) or (self.broken and self.failed):
            self.failed = True
            raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
        return [SimpleNamespace(text=f"{mask}:{p}", num_prompt_tokens=3, num_completion_tokens=1, finish_reason="stop")
                for p in prompts]

    def generate_mixed(self, prompts, sampling, masks, seeds=None):
        out = self.generate(prompts, sampling, seeds=seeds)  # one engine call, as a mixed batch is
        return [SimpleNamespace(**{**vars(o), "text": f"{m}:{p}"}) for o, m, p in zip(out, masks, prompts)]


def _actor(engine):
    from pipeline.actors import GenerationActor
    from pipeline.shard_schema import schema_for

    actor = object.__new__(GenerationActor)
    actor.index, actor.batches, actor.llm, actor.sampling, actor._one_token = 0, 0, engine, None, None
    actor.mixed = True  # the default: every variant of the batch in one engine call
    actor.masks = {"normal": None, "retrieval_masked": "16-1"}
    actor.schema = schema_for(list(actor.masks))
    return actor


def test_actor_bisects_a_failing_batch_down_to_its_poison_prompts():
    engine = FakeEngine()
    batch = [(f"p{i}", "bad" if i in (1, 4) else f"good {i}", i) for i in range(6)]
    table, stats = _actor(engine).generate(batch)
    assert table.column("prompt_id").to_pylist() == ["p0", "p2", "p3", "p5"]  # batch order kept
    assert table.column("retrieval_masked__text").to_pylist() == [f"16-1:good {i}" for i in (0, 2, 3, 5)]
    reason = "engine_error: RuntimeError: CUDA error: an illegal memory access"  # the first line only
    assert stats["rejects"] == [("p1", reason), ("p4", reason)]
    assert stats["tokens"] == 8


def test_actor_reraises_when_the_engine_is_broken_so_the_pool_replaces_it():
    class EngineDeadError(Exception):  # vLLM's name for an engine core that died
        pass

    class DyingEngine(FakeEngine):
        def generate(self, prompts, sampling, mask=None, seeds=None):
            self.calls.append(list(prompts))
            raise EngineDeadError("EngineCore encountered an issue")

    # broken: the probe fails after the error; leftover: requests stuck inside the engine; dying: dead core
    for engine, error in ((FakeEngine(broken=True), RuntimeError), (FakeEngine(leftover=True), RuntimeError),
                          (DyingEngine(), EngineDeadError)):
        with pytest.raises(error):
            _actor(engine).generate([("p0", "good", 0), ("p1", "bad", 1)])
        assert len(engine.calls) <= 2  # the batch, at most one probe: no bisection


def test_actor_does_not_bisect_a_user_error():
    from retrieval_heads.errors import RetmaskError

    class MaskRefusingEngine(FakeEngine):
        def generate(self, prompts, sampling, mask=None, seeds=None):
            self.calls.append(list(prompts))
            raise RetmaskError("mask 16-1 does not fit this model")

    engine = MaskRefusingEngine()
    with pytest.raises(RetmaskError, match="does not fit"):
        _actor(engine).generate([("p0", "good", 0), ("p1", "good", 1)])
    assert len(engine.calls) == 1
