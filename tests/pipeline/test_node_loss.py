"""Processes lost under a running generation: the driver alone (kill -9), or a whole Ray node.

Nothing committed is lost, nothing is written twice, and no Ray process outlives the test. Clusters here
are our own (own temp dirs and ports) and are torn down by pid, never by `ray stop`, which would kill every
Ray process on the machine.
"""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from support import (
    REPO,
    LoopbackCluster,
    alive,
    child_env,
    data_files,
    job_summary,
    kill_all,
    process_tree,
    prompt_rows,
    retmask,
    wait_for_commits,
    write_config,
    write_prompts,
    write_scores,
    written_ids,
)

from pipeline.inspect import inspect_run
from pipeline.shards import read_manifest, read_pairs_table

pytestmark = pytest.mark.slow


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


# ---------------------------------------------------------------------------------------------------
# the driver killed alone


def test_driver_alone_killed_leaves_no_ray_behind_and_a_rerun_finishes_exactly_once(tmp_path, embedded_model_path):
    """kill -9 of the driver pid only (not its group): the local Ray it started goes down by itself
    (GCS and raylet share the driver's fate through the kernel; workers and agents follow their raylet),
    leftovers hold nothing a rerun needs, and the rerun finishes the job."""
    rows = prompt_rows(16)  # 4 batches of 4: time to kill between the first commit and the last
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", prompts=str(write_prompts(tmp_path / "p.jsonl", rows)),
                          scores=str(write_scores(tmp_path / "s.json")), out=str(out))
    log_path = tmp_path / "first.log"
    log = open(log_path, "w")
    driver = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", "--config", str(config)], cwd=REPO,
                              env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    spawned: list[psutil.Process] = []
    try:
        wait_for_commits(out, driver, log_path)
        spawned = process_tree(driver.pid)[1:]  # GCS, raylet, agents, the actor with its engine
        names = [_name(p) for p in spawned]
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone: its children are not signalled
        killed_at = time.time()
        driver.wait()
        assert "raylet" in names and any("GenerationActor" in name for name in names), names
        committed = read_pairs_table(out).num_rows
        assert 0 < committed < len(rows), "the run finished before it could be killed"
        # GCS, raylet, workers and the engine go within seconds: no cluster for the rerun to join, no second
        # engine's memory. Ray's two agents notice at once too, but first try to report to the dead GCS
        # (a fixed 60 s timeout); they hold nothing the rerun needs.
        core = [p for p, name in zip(spawned, names) if not name.endswith("Agent")]
        _, core = psutil.wait_procs(core, timeout=15)
        assert not core, f"outlived the killed driver: {[(p.pid, _name(p)) for p in core]}"

        result = retmask("generate", "--config", str(config))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{len(rows) - committed} prompts generated ({len(rows)} in" in result.stdout
        assert written_ids(out) == [r["id"] for r in rows]  # each exactly once
        assert data_files(out) == sorted(s["file"] for s in read_manifest(out)["shards"])
        assert inspect_run(out)["problems"] == []
        _, left = psutil.wait_procs(alive(spawned), timeout=max(10.0, killed_at + 90 - time.time()))
        assert not left, f"processes of the killed driver still alive: {[(p.pid, _name(p)) for p in left]}"
    finally:
        if driver.poll() is None:
            spawned += process_tree(driver.pid)[1:]
            driver.kill()
            driver.wait()
        kill_all(spawned)  # never leak processes into the rest of the suite
        log.close()


# ---------------------------------------------------------------------------------------------------
# a node lost: a two-node Ray cluster on loopback


@pytest.fixture
def two_nodes(tmp_path):
    cluster = LoopbackCluster(tmp_path)
    try:
        cluster.add_node(num_cpus=2)  # the head: room for its own engine and the lost node's replacement
        cluster.add_node(num_cpus=2)
        yield cluster
    finally:
        cluster.shutdown()


def test_node_lost_mid_run_its_actor_is_replaced_on_the_survivor_and_nothing_is_lost(two_nodes, tmp_path,
                                                                                     embedded_model_path):
    head, worker = two_nodes.nodes
    rows = prompt_rows(24)  # 12 batches of 2 over two engines: several seconds of work left after the first commit
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", prompts=str(write_prompts(tmp_path / "p.jsonl", rows)),
                          scores=str(write_scores(tmp_path / "s.json")), out=str(out), sampling={"max_tokens": 8},
                          batch_size=2, batches_in_flight=1, num_actors=2, num_cpus_per_actor=1, cpu_bind=["0", "1"])
    log_path = tmp_path / "driver.log"
    env = {**two_nodes.env, "RAY_ADDRESS": two_nodes.address}
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.generate", "--config", str(config)], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_commits(out, driver, log_path)
            ready = {int(a): (int(pid), node) for a, pid, node in
                     re.findall(r"actor (\d) ready: pid (\d+) on node (\w+)", log_path.read_text())}
            assert len(ready) == 2 and ready[0][1] != ready[1][1], f"actors not spread over both nodes: {ready}"
            on_worker = {pid for pid, _ in ready.values()} & {p.pid for p in process_tree(worker.pid)}
            assert len(on_worker) == 1, "exactly one actor runs on the node to lose"
            two_nodes.lose(worker)
            engines_on_head: set[int] = set()
            deadline = time.time() + 400
            while driver.poll() is None:  # the replacement must start among the head's processes
                engines_on_head |= {p.pid for p in process_tree(head.pid) if "GenerationActor" in _name(p)}
                assert time.time() < deadline, "the run did not finish after the node loss"
                time.sleep(0.5)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    text = log_path.read_text()
    assert driver.returncode == 0, text[-4000:]
    summary = job_summary(text)
    # One replacement, or two: the first may be placed on the lost node before Ray has declared it dead
    # (SPREAD prefers the emptier node) and fail there; the next one goes to the survivor.
    assert summary["actor_replacements"] in (1, 2) and summary["rows_written"] == len(rows)
    assert "actor died" in text and "re-queueing 2 prompts" in text  # the lost node's batch ran again
    replacement = engines_on_head - {pid for pid, _ in ready.values()}
    assert replacement, f"no replacement engine started on the surviving node: {engines_on_head}"
    assert written_ids(out) == [r["id"] for r in rows]  # each exactly once
    assert data_files(out) == sorted(s["file"] for s in read_manifest(out)["shards"])
    assert inspect_run(out)["problems"] == []
