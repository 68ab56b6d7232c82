"""What the tests share: score files, prompt files and run configs, pair rows and shard directories, the CLI in
its own process, a tiny random Llama, a local S3 server, and Ray on loopback.

Test helpers live here, with the tests, never in the product. Import them by name (``from support import
write_scores``): ``tests/`` is on ``sys.path`` through ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
LAYERS, HEADS = 30, 9  # the embedded SmolLM2-135M-Instruct
RETRIEVAL = ((16, 1), (17, 2), (18, 3), (19, 0), (20, 5))  # the heads ``write_scores`` scores by default

# ---------------------------------------------------------------------------------------------------
# inputs: head scores, prompts, a generation config sized for 2 shared cores


def write_scores(path: Path, layers: int = LAYERS, heads: int = HEADS, retrieval=RETRIEVAL) -> Path:
    """A Wu-format score file (one trial per head): ``retrieval`` heads at 0.5, every other head 0."""
    retrieval = set(retrieval)
    path.write_text(json.dumps({f"{l}-{h}": [0.5 if (l, h) in retrieval else 0.0]
                                for l in range(layers) for h in range(heads)}))
    return path


# A few prompts, 16 new tokens, a 64 MiB KV cache: one engine start dominates a run.
SMALL = {
    "model": "smollm2-135m-instruct",
    "prompts_source": "jsonl",
    "variants": ["normal", "retrieval_masked"],
    "sampling": {"max_tokens": 16},
    "max_model_len": 256,
    "engine": {"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 8},
    "batch_size": 4,
}


def prompt_rows(n: int, prefix: str = "p") -> list[dict]:
    """``n`` short chat prompts with ids ``p00``, ``p01``, ..."""
    topics = ["rivers", "bread", "chess", "volcanoes", "owls", "bicycles", "tea", "comets"]
    return [{"id": f"{prefix}{i:02d}",
             "prompt": f"In two sentences, tell me something about {topics[i % len(topics)]} (#{i})."}
            for i in range(n)]


def write_prompts(path: Path, rows: list, extra_lines: list[str] = ()) -> Path:
    """A JSONL prompt file: one line per row, then ``extra_lines`` as written (bad rows, say)."""
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(path: Path, **fields) -> Path:
    """A generate config YAML: ``SMALL`` with ``fields`` on top."""
    path.write_text(yaml.safe_dump({**SMALL, **fields}))
    return path


def niah_prompt(chars: int = 3000) -> str:
    """A needle-in-a-haystack prompt: the first built-in needle halfway into ``chars`` of the built-in text."""
    from retrieval_heads.niah import PROMPT_TEMPLATE, builtin_haystack, builtin_needles, insert_needles

    needle = builtin_needles()[0]
    context, _ = insert_needles(builtin_haystack()[:chars], [needle.needle], [0.5])
    return PROMPT_TEMPLATE.format(context=context, question=needle.question)


# ---------------------------------------------------------------------------------------------------
# the CLI, run as a user runs it: its own process


def child_env(**extra: str) -> dict:
    """This environment for a child process, without ``RAY_ADDRESS``: never join someone else's cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return env


def retmask(*args, module: str = "jobs.cli", timeout: int = 600, env: dict | None = None,
            **popen) -> subprocess.CompletedProcess:
    """``retmask ARGS`` (or ``python -m MODULE ARGS``) from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env or child_env(), **popen)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The run contract's user error: exit 1, one ``retmask: error:`` line naming every needle, no traceback.
    Returns that line."""
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("retmask: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def job_summary(stdout: str) -> dict:
    """The JSON summary ``python -m jobs.generate`` prints last (actor logs may interleave)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and '"rows_written"' in line:
            return json.loads(line)
    raise AssertionError(f"no summary in output:\n{stdout[-3000:]}")


# ---------------------------------------------------------------------------------------------------
# generation outputs: pair rows and shard directories, written without an engine


VARIANTS = ["normal", "retrieval_masked", "random_masked"]
RUN_CONFIG = {  # a run config that names a model existing nowhere: training on it is off-policy
    "model": {"id": "test/model", "path": "/nowhere", "hash": "sha256:0"},
    "masks": {}, "sampling": {"temperature": 0.6}, "seed": 0, "packages": {},
}


def pair_row(pid: str, normal: str | None, masked: str, *, normal_reason: str = "stop", masked_reason: str = "stop",
             normal_tokens: int = 5, masked_tokens: int = 5, prompt: str | None = None) -> dict:
    """A row of the three ``VARIANTS``: ``normal`` and ``retrieval_masked`` as given, 20 prompt tokens."""
    from pipeline.shard_schema import make_row

    return make_row(pid, prompt if prompt is not None else f"question {pid}", 0, 20, {
        "normal": (normal, normal_tokens, normal_reason),
        "retrieval_masked": (masked, masked_tokens, masked_reason),
        "random_masked": (f"random {pid}", 5, "stop"),
    })


NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Quito", "Tallinn", "Hanoi", "Perth", "Bergen", "Cusco", "Tunis"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "teal", "black"]
GENERIC = ["I don't know.", "Sorry, I can't tell.", "No idea, sorry."]


def crafted_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs where ``normal`` uses a fact stated in the prompt and ``retrieval_masked`` answers generically
    (the signal RetMask expects: without retrieval heads the answer ignores the context); ``random_masked``
    keeps the fact. Short on purpose: every token costs a CPU test time."""
    from pipeline.shard_schema import make_row

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, city, color, number = rng.choice(NAMES), rng.choice(CITIES), rng.choice(COLORS), rng.randint(10, 99)
        prompt, answer = [
            (f"I am {name} from {city}. Where am I from?", f"You are from {city}."),
            (f"{name}'s door is {color}. What color is it?", f"It is {color}."),
            (f"The code is {number}. What is the code?", f"The code is {number}."),
        ][i % 3]
        generic = rng.choice(GENERIC)
        outputs = {
            "normal": (answer, len(answer.split()) + 2, "stop"),
            "retrieval_masked": (generic, len(generic.split()) + 2, "stop"),
            "random_masked": (answer.replace(".", "!"), len(answer.split()) + 2, "stop"),
        }
        rows.append(make_row(f"p{i:05d}", prompt, seed, len(prompt.split()) + 30, outputs))
    return rows


def model_record(model_dir: str) -> dict:
    """The manifest's record of the model that generated the pairs, as ``retmask generate`` writes it."""
    from pipeline.provenance import hash_model_dir

    return {"id": Path(model_dir).name, "path": str(model_dir), "hash": hash_model_dir(model_dir)}


def write_shards(out: Path, rows: list[dict], variants: list[str] = VARIANTS, *, run_config: dict = RUN_CONFIG,
                 shard_size: int = 64, model: str | None = None) -> Path:
    """Commit ``rows`` to ``out`` as a generation run would (manifest + data/part-*.parquet).

    ``model``: the local checkpoint recorded as the generator (training it is then on-policy); without it the
    manifest names the model of ``run_config``.
    """
    from pipeline.shard_writer import open_run

    run_config = {**run_config, "model": model_record(model)} if model else run_config
    writer = open_run(out, run_config, variants)
    for i in range(0, len(rows), shard_size):
        writer.write_shard(rows[i:i + shard_size])
    writer.close()
    return out


def data_files(out: Path) -> list[str]:
    """Every file under ``out/data``, as the manifest names them (``data/part-...``)."""
    return sorted(f"data/{p.name}" for p in (out / "data").iterdir())


def written_ids(out: Path) -> list[str]:
    """The prompt ids of every committed row, sorted, repeats kept (so "each exactly once" can be checked)."""
    from pipeline.shards import read_pairs_table

    return sorted(read_pairs_table(out).column("prompt_id").to_pylist())


def wait_for_commits(out: Path, proc: subprocess.Popen, log: Path, n: int = 1, timeout: float = 400) -> None:
    """Return once ``out`` lists ``n`` committed shards; fail if ``proc`` exits first or ``timeout`` passes."""
    from pipeline.shards import read_manifest

    deadline = time.time() + timeout
    while True:
        try:
            if len(read_manifest(out)["shards"]) >= n:
                return
        except Exception:  # not created yet, or being replaced
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"{n} shard(s) not committed in time"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------
# models


def tiny_llama(num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8,
               vocab_size: int = 128, seed: int = 0):
    """A random-weight Llama built in-process: the same weights for the same arguments."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=num_heads * head_dim,
        intermediate_size=4 * num_heads * head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------------
# object storage: a real S3 API (moto) on 127.0.0.1


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A local S3 server for the duration of the block; yields its ``host:port``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"{host}:{port}"
    finally:
        server.stop()


def s3_bucket(endpoint: str, access_key: str = "testing", secret_key: str = "testing"):
    """``(filesystem, bucket)``: a pyarrow filesystem on the server at ``endpoint`` and a new bucket in it."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key=access_key, secret_key=secret_key,
                           region="us-east-1", allow_bucket_creation=True)
    bucket = f"retmask-{uuid.uuid4().hex[:8]}"
    fs.create_dir(bucket)
    return fs, bucket


# ---------------------------------------------------------------------------------------------------
# Ray: a local cluster of this process's own, or nodes started with `ray start` on loopback


@contextlib.contextmanager
def local_ray_cluster(**init_options):
    """``ray.init(address="local")``: a fresh cluster of our own (never one another job on this machine started),
    shut down after the block; one already running in this process is used as it is. Yields the ``ray`` module."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, **init_options)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list:
    """``pid`` and all its descendants, as psutil processes (empty if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(procs: list) -> list:
    """The processes of ``procs`` still running (zombies count as gone)."""
    import psutil

    running = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running


def kill_all(procs: list) -> None:
    """SIGKILL every process of ``procs`` still running, and reap them."""
    import psutil

    for proc in alive(procs):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def signal_during_engine_start(module: str, args: list[str], signum: int, log: Path, timeout: float = 900) -> int:
    """Run ``python -m module args`` in its own process group, send ``signum`` to the whole group (as a terminal's
    Ctrl-C does) once the vLLM engine's processes are starting, and return the exit code after checking that
    no process of the tree is left."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    tree: list = []
    try:
        deadline = time.monotonic() + timeout
        while len(tree) < 2 and proc.poll() is None and time.monotonic() < deadline:  # the engine is starting
            time.sleep(1)
            tree = process_tree(proc.pid)
        assert proc.poll() is None, f"exited before the engine started:\n{log.read_text()[-4000:]}"
        os.killpg(proc.pid, signum)
        code = proc.wait(timeout=120)
        deadline = time.monotonic() + 30
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive(tree) == [], f"left running: {alive(tree)}"
        return code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_all(tree)
        proc.wait(timeout=30)


class LoopbackCluster:
    """Ray nodes started with `ray start --block`, each with its own temp dir and ports, on 127.0.0.1.

    Torn down by pid, never by `ray stop`, which would kill every Ray process on this machine, other people's
    included. ``dashboard=True`` gives the head a dashboard (``dashboard_url``), for `ray job submit`.
    """

    # Node loss is noticed after a few missed health checks: ~3 s instead of Ray's default ~30 s.
    SYSTEM_CONFIG = '{"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000, ' \
                    '"health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}'

    def __init__(self, tmp: Path, dashboard: bool = False):
        self.tmp, self.nodes, self.address, self.dashboard = tmp, [], None, dashboard
        self.dashboard_url: str | None = None
        self.env = child_env(RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def add_node(self, num_cpus: int, num_gpus: int = 0) -> subprocess.Popen:
        """Start one raylet (the first is the head); ``num_gpus`` are declared, Ray schedules them as resources."""
        temp_dir = f"/tmp/rmn-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths must stay under 108 bytes
        names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               f"--num-gpus={num_gpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               "--object-store-memory=100000000"]
        head = self.address is None
        if head:
            gcs_port = free_port()
            self.address = f"127.0.0.1:{gcs_port}"
            cmd += ["--head", f"--port={gcs_port}", f"--system-config={self.SYSTEM_CONFIG}",
                    f"--ray-client-server-port={free_port()}"]
            if self.dashboard:
                dashboard_port = free_port()
                self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
                cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
            else:
                cmd += ["--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        cmd += [f"--{name}={free_port()}" for name in names]
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
        if head and self.dashboard:
            self._wait_for_dashboard(node, log_path)
        return node

    def _wait_for_dashboard(self, node: subprocess.Popen, log_path: Path) -> None:
        deadline = time.time() + 180
        while True:
            assert node.poll() is None, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
                return
            except OSError:
                assert time.time() < deadline, "the Ray dashboard did not come up"
                time.sleep(1)

    def lose(self, node: subprocess.Popen) -> None:
        """The node goes away at once, as a machine that loses power: SIGKILL to every process it runs."""
        import psutil

        procs = process_tree(node.pid) + self._stragglers(node.temp_dir)
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        node.wait()

    def shutdown(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            procs = process_tree(node.pid) if node.poll() is None else []  # a reaped pid may be someone else's now
            node.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                pass
            kill_all(procs + self._stragglers(node.temp_dir))
            if node.poll() is None:
                node.kill()
                node.wait()
            node.log.close()
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    @staticmethod
    def _stragglers(temp_dir: str) -> list:
        import psutil

        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        return found
