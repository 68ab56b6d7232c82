"""Processes lost under a running generation: the driver alone (kill -9), or a whole Ray node.

Nothing committed is lost, nothing is written twice, and no Ray process outlives the test. Clusters here
are our own (own temp dirs and ports) and are torn down by pid, never by `ray stop`, which would kill every
Ray process on the machine.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from gen_support import (
    REPO,
    child_env,
    data_files,
    job_summary,
    prompt_rows,
    retmask,
    write_config,
    write_prompts,
    write_scores,
)

from pipeline.inspect import inspect_run
from pipeline.shards import read_manifest, read_pairs_table

pytestmark = pytest.mark.slow


def _ids(out: Path) -> list[str]:
    return sorted(read_pairs_table(out).column("prompt_id").to_pylist())


def _committed_shards(out: Path) -> int:
    try:
        return len(read_manifest(out)["shards"])
    except Exception:  # not created yet, or being replaced
        return 0


def _wait_for_a_commit(out: Path, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while _committed_shards(out) < 1:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no shard was committed in time"
        time.sleep(0.1)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _kill(procs: list[psutil.Process]) -> None:
    for proc in _alive(procs):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


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
        _wait_for_a_commit(out, driver, log_path)
        spawned = _tree(driver.pid)[1:]  # GCS, raylet, agents, the actor with its engine
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
        assert _ids(out) == [r["id"] for r in rows]  # each exactly once
        assert data_files(out) == sorted(s["file"] for s in read_manifest(out)["shards"])
        assert inspect_run(out)["problems"] == []
        _, left = psutil.wait_procs(_alive(spawned), timeout=max(10.0, killed_at + 90 - time.time()))
        assert not left, f"processes of the killed driver still alive: {[(p.pid, _name(p)) for p in left]}"
    finally:
        if driver.poll() is None:
            spawned += _tree(driver.pid)[1:]
            driver.kill()
            driver.wait()
        _kill(spawned)  # never leak processes into the rest of the suite
        log.close()


# ---------------------------------------------------------------------------------------------------
# a node lost: a two-node Ray cluster on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """Ray nodes started with `ray start --block`, each with its own temp dir and ports, on 127.0.0.1."""

    # Node loss is noticed after a few missed health checks: ~3 s instead of Ray's default ~30 s.
    SYSTEM_CONFIG = '{"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000, ' \
                    '"health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}'

    def __init__(self, tmp: Path):
        self.tmp, self.nodes, self.address = tmp, [], None
        self.env = child_env(RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def add_node(self, num_cpus: int, num_gpus: int = 0) -> subprocess.Popen:
        """Start one raylet (the first is the head); ``num_gpus`` are declared, Ray schedules them as resources."""
        temp_dir = f"/tmp/rmn-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths must stay under 108 bytes
        names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
               "--disable-usage-stats", f"--temp-dir={temp_dir}", "--object-store-memory=100000000"]
        if self.address is None:
            gcs_port = _free_port()
            self.address = f"127.0.0.1:{gcs_port}"
            cmd += ["--head", f"--port={gcs_port}", "--include-dashboard=false",
                    f"--system-config={self.SYSTEM_CONFIG}", f"--ray-client-server-port={_free_port()}"]
        else:
            cmd += [f"--address={self.address}"]
        cmd += [f"--{name}={_free_port()}" for name in names]
        log_path = self.tmp / f"node{len(self.nodes)}.log"
        log = open(log_path, "w")
        node = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node.temp_dir, node.log = temp_dir, log
        self.nodes.append(node)
        deadline = time.time() + 120
        while "Ray runtime started" not in log_path.read_text():
            assert node.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "a Ray node did not start"
            time.sleep(0.5)
        return node

    def lose(self, node: subprocess.Popen) -> None:
        """The node goes away at once, as a machine that loses power: SIGKILL to every process it runs."""
        procs = _tree(node.pid) + self._stragglers(node.temp_dir)
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        node.wait()

    def shutdown(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            procs = _tree(node.pid) if node.poll() is None else []  # a reaped pid may belong to someone else now
            node.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                pass
            _kill(procs + self._stragglers(node.temp_dir))
            if node.poll() is None:
                node.kill()
                node.wait()
            node.log.close()
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    @staticmethod
    def _stragglers(temp_dir: str) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        return found


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
            _wait_for_a_commit(out, driver, log_path)
            ready = {int(a): (int(pid), node) for a, pid, node in
                     re.findall(r"actor (\d) ready: pid (\d+) on node (\w+)", log_path.read_text())}
            assert len(ready) == 2 and ready[0][1] != ready[1][1], f"actors not spread over both nodes: {ready}"
            on_worker = {pid for pid, _ in ready.values()} & {p.pid for p in _tree(worker.pid)}
            assert len(on_worker) == 1, "exactly one actor runs on the node to lose"
            two_nodes.lose(worker)
            engines_on_head: set[int] = set()
            deadline = time.time() + 400
            while driver.poll() is None:  # the replacement must start among the head's processes
                engines_on_head |= {p.pid for p in _tree(head.pid) if "GenerationActor" in _name(p)}
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
    assert _ids(out) == [r["id"] for r in rows]  # each exactly once
    assert data_files(out) == sorted(s["file"] for s in read_manifest(out)["shards"])
    assert inspect_run(out)["problems"] == []
