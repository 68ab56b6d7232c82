"""Faults during generation: a killed actor, batches that keep failing. Nothing committed is lost, nothing is
written twice, and a rerun of the same command finishes the job. (A killed driver: tests/pipeline/test_node_loss.py
and tests/jobs/test_run_contract.py.)"""

import os
import subprocess
import sys

import pytest
from support import (
    REPO,
    child_env,
    job_summary,
    local_ray_cluster,
    prompt_rows,
    write_config,
    write_prompts,
    write_scores,
    written_ids,
)

from pipeline.inspect import inspect_run
from pipeline.shards import read_manifest
from retrieval_heads.errors import RetmaskError


@pytest.mark.slow
def test_actor_killed_mid_batch_is_replaced_and_its_batches_rerun(tmp_path, embedded_model_path):
    rows = prompt_rows(12)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", prompts=str(write_prompts(tmp_path / "p.jsonl", rows)),
                          scores=str(write_scores(tmp_path / "s.json")), out=str(out))
    # the driver SIGKILLs a busy actor's process right after its first commit (pipeline.generate)
    env = child_env(RETMASK_FAULT_KILL_ACTOR_AFTER="1")
    result = subprocess.run([sys.executable, "-m", "jobs.generate", "--config", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = job_summary(result.stdout)
    assert summary["actor_replacements"] == 1 and summary["rows_written"] == len(rows)
    assert "fault injection: SIGKILL actor 0" in result.stderr and "re-queueing 4 prompts" in result.stderr
    assert written_ids(out) == [r["id"] for r in rows]
    assert len(read_manifest(out)["shards"]) == 3 and inspect_run(out)["problems"] == []


# ---------------------------------------------------------------------------------------------------
# the pool's retry rules, with stand-in actors (no engine: seconds, not minutes)


class FlakyActor:
    """Fails the batches named in ``fail`` on their first try: by dying, or by raising."""

    def __init__(self, index, fail, how, marker_dir):
        self.index, self.fail, self.how, self.marker_dir = index, fail, how, marker_dir

    def info(self):
        import ray

        return {"index": self.index, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def generate(self, batch):
        import pyarrow as pa

        first_id = batch[0][0]
        marker = os.path.join(self.marker_dir, first_id)
        if first_id in self.fail and (self.how == "always" or not os.path.exists(marker)):
            open(marker, "w").close()
            if self.how == "user":
                raise RetmaskError(f"bad input in {first_id}")
            os._exit(1)  # the process dies mid-batch
        return pa.table({"prompt_id": [pid for pid, _, _ in batch]}), {"tokens": len(batch)}

    def close(self):
        pass


@pytest.fixture(scope="module")
def local_ray():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    with local_ray_cluster() as ray:
        yield ray


def _pool(ray, tmp_path, fail, how, max_retries=2):
    from pipeline.actors import ActorPool

    remote = ray.remote(FlakyActor)
    return ActorPool(lambda i: remote.options(num_cpus=0.5, max_restarts=0).remote(i, fail, how, str(tmp_path)),
                     num_actors=2, per_actor=2, max_retries=max_retries)


def _batches(n):
    return [[(f"b{i}-{j}", "text", 0) for j in range(3)] for i in range(n)]


def test_pool_reruns_the_batches_of_a_dead_actor_once_each(local_ray, tmp_path):
    pool = _pool(local_ray, tmp_path, fail={"b2-0", "b5-0"}, how="once")
    pool.wait_ready()
    done = [table.column("prompt_id").to_pylist() for _, table, _ in pool.map_unordered(_batches(8))]
    assert sorted(pid for ids in done for pid in ids) == sorted(p for b in _batches(8) for p, _, _ in b)
    assert pool.replacements >= 2
    pool.close()


def test_pool_gives_up_on_a_batch_that_keeps_killing_actors(local_ray, tmp_path):
    pool = _pool(local_ray, tmp_path, fail={"b1-0"}, how="always", max_retries=2)
    with pytest.raises(RetmaskError, match=r"first id b1-0\) failed 3 times.*rerun to resume"):
        list(pool.map_unordered(_batches(3)))
    pool.close()


def test_pool_surfaces_a_user_error_from_an_actor_at_once(local_ray, tmp_path):
    pool = _pool(local_ray, tmp_path, fail={"b0-0"}, how="user")
    with pytest.raises(RetmaskError, match="^bad input in b0-0$"):
        list(pool.map_unordered(_batches(2)))
    assert pool.replacements == 0
    pool.close()
