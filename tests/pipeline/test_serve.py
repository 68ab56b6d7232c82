"""`retmask serve`: vLLM's OpenAI server on the gated engine answers under each named mask exactly as the offline
engine does, keeps masks apart under concurrency and prefix caching, refuses unknown names with a 400 that lists
the known ones, and keeps the run contract (one-line errors, exit 143 on SIGTERM with no process left).

One server per module (an engine start is minutes on 2 cores); the offline answers come from the session's
``gated`` engine, built with the same settings."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    REPO,
    alive,
    assert_user_error,
    child_env,
    free_port,
    kill_all,
    niah_prompt,
    process_tree,
    retmask,
    signal_during_engine_start,
    write_scores,
)

from pipeline.serve import PLAIN, MaskRouter, ServeConfig, ServedMask, named_masks, parse_masks
from retrieval_heads.errors import RetmaskError
from retrieval_heads.masking import HeadMask
from retrieval_heads.models import ModelShape

MASK_SPEC = "17-3,18-6,18-7,20-6,23-2"  # tests/pipeline/test_engine.py's mask: it changes greedy answers
LATE_SPEC = "29-0,29-1"  # an ad-hoc mask (--masks late=...)
# the embedded SmolLM2-135M-Instruct
SHAPE = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192)
SERVED = "smollm2-135m-instruct"
MAX_TOKENS = 12
CONTEXT = niah_prompt(1500)
# Three prompts sharing a ~370-token prefix, so prefix caching has blocks to share (or leak) across masks.
PROMPTS = [CONTEXT, CONTEXT + "\nAnswer in five words.", CONTEXT + "\nAnswer briefly.",
           "Give me three tips for learning to cook."]
START_TIMEOUT = 900  # seconds: an engine start on 2 shared cores, plus the gate canary


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    masks: dict  # name -> ServedMask, as the server computed them from the same config


def _server_config(scores: Path) -> ServeConfig:
    return ServeConfig(scores=str(scores), masks=[f"late={LATE_SPEC}"], max_model_len=2048)


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_model_path):
    """``retmask serve`` in its own process group on a free loopback port, with the ``gated`` engine's settings."""
    root = tmp_path_factory.mktemp("serve")
    scores = write_scores(root / "head_scores.json", retrieval=HeadMask.parse(MASK_SPEC, SHAPE).heads)
    port, log = free_port(), root / "server.log"
    args = ["--scores", str(scores), "--masks", f"late={LATE_SPEC}", "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "2048", "--engine-dtype", "float32", "--engine-enforce-eager",
            "--engine-kv-cache-memory-bytes", str(256 << 20), "--engine-max-num-seqs", "8"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", *args], cwd=REPO, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"retmask serve exited with {proc.returncode} before listening:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"retmask serve not listening after {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield Server(url, proc, log, named_masks(_server_config(scores), SHAPE))
    finally:
        tree = process_tree(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_all(tree)  # engine processes that left the group, if any
        proc.wait(timeout=30)


def _client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)


def _ask(client, prompt: str, model: str = SERVED, mask: str | None = None) -> str:
    extra = {"vllm_xargs": {"retmask_mask": mask}} if mask is not None else None
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=MAX_TOKENS, extra_body=extra)
    return response.choices[0].message.content


def _offline(gated, prompts: list, heads) -> list[str]:
    from vllm import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [c.text for c in gated.engine.generate(prompts, greedy, mask=HeadMask.for_shape(heads, SHAPE))]


# ---------------------------------------------------------------------------------------------------
# masks by name, without a server


def test_masks_are_the_score_files_by_generations_rules_then_the_named_ones(tmp_path):
    from pipeline.engine import mask_salt

    scores = write_scores(tmp_path / "s.json", retrieval=HeadMask.parse(MASK_SPEC, SHAPE).heads)
    masks = named_masks(_server_config(scores), SHAPE)
    assert list(masks) == [PLAIN, "normal", "retrieval_masked", "random_masked", "late"]
    assert masks[PLAIN] == masks["normal"] == ServedMask(PLAIN, (), 0, None)
    assert masks["retrieval_masked"].heads == HeadMask.parse(MASK_SPEC, SHAPE).heads
    control = masks["random_masked"].heads
    assert len(control) == 5 and not set(control) & set(masks["retrieval_masked"].heads)
    assert masks["late"].heads == ((29, 0), (29, 1))
    assert [m.slot for m in masks.values()] == [0, 0, 1, 2, 3]
    assert all(m.salt == mask_salt(m.heads, SHAPE) for m in masks.values() if m.heads)
    assert named_masks(_server_config(scores), SHAPE) == masks  # the random draw is seeded


def test_mask_groups_split_at_each_name_and_bad_ones_are_refused():
    assert parse_masks(["late=17-3", "18-6", "early=0-1"]) == {"late": "17-3,18-6", "early": "0-1"}
    assert parse_masks(["late=17-3,18-6,early=0-1"]) == {"late": "17-3,18-6", "early": "0-1"}
    for bad in (["17-3"], ["none=1-1"], ["a=1-1", "a=2-2"], ["bad name=1-1"]):
        with pytest.raises(RetmaskError, match="NAME=layer-head"):
            parse_masks(bad)


def test_the_router_turns_a_mask_name_into_its_slot_and_cache_salt():
    masks = {PLAIN: ServedMask(PLAIN, (), 0, None), "late": ServedMask("late", ((29, 0),), 1, "retmask-1h-x")}
    router = MaskRouter(None, masks, SERVED)
    rewrite = lambda path, body: json.loads(router.rewrite(path, json.dumps(body).encode()))  # noqa: E731
    by_alias = rewrite("/v1/chat/completions", {"model": f"{SERVED}:late", "cache_salt": "user7"})
    assert by_alias == {"model": SERVED, "cache_salt": "retmask-1h-x:user7", "vllm_xargs": {"retmask_mask": 1}}
    by_xargs = rewrite("/v1/completions", {"model": SERVED, "vllm_xargs": {"retmask_mask": "late", "k": 2}})
    assert by_xargs == {"model": SERVED, "cache_salt": "retmask-1h-x", "vllm_xargs": {"k": 2, "retmask_mask": 1}}
    assert rewrite("/v1/completions", {"model": f"{SERVED}:none"}) == {"model": SERVED}
    assert router.rewrite("/v1/chat/completions", b'{"model": "other"}') is None  # untouched: vLLM decides
    for path, body, needle in [
        ("/v1/chat/completions", {"vllm_xargs": {"retmask_mask": 1}}, "must be a mask name"),
        ("/v1/responses", {"model": f"{SERVED}:late"}, "apply to /v1/chat/completions and /v1/completions"),
        ("/v1/chat/completions", {"model": f"{SERVED}:late", "vllm_xargs": {"retmask_mask": "none"}}, "name one"),
        ("/inference/v1/generate", {"sampling_params": {"extra_args": {"retmask_mask": 1}}}, "vllm_xargs"),
    ]:
        with pytest.raises(Exception, match=needle):
            router.rewrite(path, json.dumps(body).encode())


# ---------------------------------------------------------------------------------------------------
# the run contract, in the CLI's own process (no engine starts)


@pytest.mark.parametrize("case", ["bad_scores", "unknown_model", "port_in_use"])
def test_bad_input_is_one_error_line_and_exit_1(case, tmp_path):
    bad = tmp_path / "scores.json"
    bad.write_text("{not json")
    args, needle = {"bad_scores": (["--scores", str(bad)], str(bad)),
                    "unknown_model": (["--model", "no-such-model"], "no-such-model")}.get(case, ([], ""))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        if case == "port_in_use":
            needle = f"cannot listen on 127.0.0.1:{port}"
        result = retmask("serve", *args, "--port", str(port), timeout=300)
    assert_user_error(result, needle)


# ---------------------------------------------------------------------------------------------------
# the live server


@pytest.mark.slow
def test_each_mask_answers_as_the_offline_engine_does(server, gated):
    client = _client(server)
    plain = [_ask(client, p) for p in PROMPTS]
    masked = [_ask(client, p, model=f"{SERVED}:retrieval_masked") for p in PROMPTS]
    assert plain == _offline(gated, PROMPTS, ())
    assert masked == _offline(gated, PROMPTS, HeadMask.parse(MASK_SPEC, SHAPE).heads)
    assert plain != masked  # the mask acts: otherwise the equalities above prove nothing
    assert [_ask(client, p, mask=PLAIN) for p in PROMPTS[:1]] == plain[:1]
    assert [_ask(client, p, mask="retrieval_masked") for p in PROMPTS[:1]] == masked[:1]


@pytest.mark.slow
def test_concurrent_requests_under_different_masks_each_get_their_own_answers(server, gated):
    client = _client(server)
    names = list(server.masks)
    for prompt in PROMPTS:  # the plain model's KV blocks of the shared prefix are cached first
        _ask(client, prompt)
    jobs = [(prompt, name) for prompt in PROMPTS for name in names]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _ask(client, job[0], mask=job[1]), jobs))
    expected = {name: _offline(gated, PROMPTS, mask.heads) for name, mask in server.masks.items()}
    assert answers == [expected[name][PROMPTS.index(prompt)] for prompt, name in jobs]
    distinct = {m.slot for m in server.masks.values()}  # none and normal are both the plain model
    assert len({tuple(e) for e in expected.values()}) == len(distinct)  # every mask answers differently somewhere


@pytest.mark.slow
def test_an_unknown_mask_is_a_400_naming_the_known_masks(server):
    from openai import BadRequestError

    client = _client(server)
    for how in ({"model": f"{SERVED}:nope"}, {"mask": "nope"}):
        with pytest.raises(BadRequestError) as err:
            _ask(client, "Hi", **how)
        assert err.value.status_code == 400
        message = err.value.body["message"]
        assert "unknown mask 'nope'" in message and "\n" not in message
        assert all(name in message for name in server.masks)
    listed = [m.id for m in client.models.list()]
    assert listed == [SERVED] + [f"{SERVED}:{name}" for name in server.masks if name not in (PLAIN, "normal")]


@pytest.mark.slow
def test_sigterm_stops_the_server_with_exit_143_and_no_process_left(server):
    # Last in this module: it stops the module's server.
    tree = process_tree(server.proc.pid)
    assert len(tree) > 1  # the engine's own processes are there to be stopped
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=120) == 143
    deadline = time.monotonic() + 30
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive(tree) == []
    assert "retmask: terminated" in server.log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_a_signal_while_the_engine_starts_exits_with_its_code_and_no_process_left(tmp_path, signum, code, word):
    # A terminal's Ctrl-C (or a scheduler's SIGTERM) reaches the whole process group, engine processes
    # included, mid-start: vLLM's start swallows the interruption in its handshake and would wait for them.
    log = tmp_path / "server.log"
    args = ["--port", str(free_port()), "--max-model-len", "2048", "--engine-dtype", "float32",
            "--engine-enforce-eager", "--engine-kv-cache-memory-bytes", str(256 << 20)]
    assert signal_during_engine_start("jobs.serve", args, signum, log) == code, log.read_text()[-4000:]
    assert f"retmask: {word}" in log.read_text()
