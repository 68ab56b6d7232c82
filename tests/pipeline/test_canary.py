"""The gate canary: a healthy engine proves its head gate at start and once per new mask; a dead gate is refused.

A dead gate is what a compiled graph or CUDA graph that lost the hook would run: the buffers switch, the
logits do not. It is simulated in a child process (engine core in-process, so the hook is reachable) by
test-side monkeypatching of the hook that ``install_gates`` registers.
"""

import json
import logging
import subprocess
import sys

import pytest
from support import REPO, child_env

# Heads no other test masks, so the session engine has not proven this mask yet.
FRESH_SPEC, FRESH_HEADS = "4-2,11-5", ((4, 2), (11, 5))

# Small engine settings, as the session engine's (tests/pipeline/conftest.py).
ENGINE = dict(dtype="float32", max_model_len=2048, kv_cache_memory_bytes=256 << 20, max_num_seqs=8, enforce_eager=True)

DEAD_GATE = r'''
import json, sys
import vllm
from vllm import SamplingParams
import pipeline.gate_tables as tables
from pipeline.engine import EngineConfig, GatedLLM
from retrieval_heads.errors import RetmaskError

gate = "alive"
real_hook = tables.gate_input

def switchable_hook(module, args):
    # "dead": no multiply at all; "decode_dead": the multiply runs for prefill batches only; "index_dead": the
    # per-token slot index is never read, so every token takes the engine-wide row (here: all ones).
    if gate == "dead" or (gate == "decode_dead" and args[0].shape[0] == 1):
        return None
    if gate == "index_dead" and not module.retmask_active:
        return None
    return real_hook(module, args)

tables.gate_input = switchable_hook  # install_gates registers it on every o_proj while the engine loads

def refusal(call):
    try:
        call()
    except RetmaskError as err:
        return str(err)
    return None

config = EngineConfig(**json.loads(sys.argv[1]))
engine = GatedLLM.from_config(config)
greedy = SamplingParams(temperature=0.0, max_tokens=4)
out = {"proven_at_start": sorted(len(heads) for heads in engine.gate_checks)}
gate = "index_dead"
out["mixed"] = refusal(lambda: engine.generate_mixed(["Hi", "Hi"], greedy, masks=[None, "5-1"]))
out["mixed_again"] = refusal(lambda: engine.generate_mixed(["Hi", "Hi"], greedy, masks=[None, "5-1"]))
gate = "alive"
out["mixed_alive"] = len(engine.generate_mixed(["Hi", "Hi"], greedy, masks=[None, "5-1"]))
gate = "dead"
out["generate"] = refusal(lambda: engine.generate(["Hi"], greedy, mask="4-2"))
out["generate_again"] = refusal(lambda: engine.generate(["Hi"], greedy, mask="4-2"))
out["plain_tokens"] = len(engine.generate(["Hi"], greedy)[0].token_ids)
out["start_check"] = refusal(engine.check_gate)
gate = "decode_dead"
out["start_check_decode_dead"] = refusal(engine.check_gate)
# from_config on a live engine whose gate is dead: the real checks, only the load is skipped.
gate, closed, close = "dead", [], GatedLLM.close
GatedLLM.close = lambda self: (closed.append(True), close(self))
vllm.LLM = lambda *args, **kwargs: engine.llm  # GatedLLM.from_config imports it from vllm when called
out["from_config"] = refusal(lambda: GatedLLM.from_config(config))
out["closed_on_refusal"] = closed == [True]
print("CANARY_RESULT " + json.dumps(out), flush=True)
'''


@pytest.mark.slow
def test_a_healthy_engine_proves_the_gate_at_start_and_once_per_new_mask(gated, caplog, record_property):
    from vllm import SamplingParams

    engine = gated.engine
    # from_config ran the start check: the empty mask and the last layer's canary head are proven.
    assert () in engine.gate_checks and ((engine.shape.num_layers - 1, 0),) in engine.gate_checks
    assert FRESH_HEADS not in engine.gate_checks

    caplog.set_level(logging.INFO, logger="pipeline.canary")
    short = SamplingParams(temperature=0.0, max_tokens=4)
    masked = engine.generate(gated.prompts[:1], short, mask=FRESH_SPEC)
    engine.set_mask(None)
    again = engine.generate(gated.prompts[:1], short, mask=FRESH_SPEC)
    engine.set_mask(None)

    proofs = [r for r in caplog.records if "gate canary: mask 4-2,11-5 changes the prefill and decode" in r.message]
    assert len(proofs) == 1  # probed on first use only
    assert FRESH_HEADS in engine.gate_checks
    assert masked[0].token_ids == again[0].token_ids  # the probe leaves the requests' results alone
    seconds = engine.gate_checks[FRESH_HEADS]
    record_property("gate_canary_seconds_per_mask", seconds)
    print(f"gate canary: {seconds:.3f} s for mask {FRESH_SPEC} on the embedded model ({engine.config.dtype}, CPU)")


@pytest.mark.slow
def test_a_dead_gate_makes_the_engine_refuse_to_generate():
    proc = subprocess.run([sys.executable, "-c", DEAD_GATE, json.dumps(ENGINE)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=child_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CANARY_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1].removeprefix("CANARY_RESULT "))

    assert got["proven_at_start"] == [0, 1]  # alive at start: the empty mask and the canary head
    assert got["mixed"] == ("mask 5-1 has no effect on the prefill logits as a per-request mask (slot 1, gate "
                            "canary): the graph may not read the per-token slot index; use batching: switched and "
                            "report it")
    assert got["mixed_again"] == got["mixed"]  # a refused per-request mask is probed again, never trusted
    assert got["mixed_alive"] == 2
    no_effect = ("the head gate has no effect on the prefill logits under mask {} (gate canary): the compiled graph "
                 "may not contain the gate; rerun with enforce_eager=True and report it")
    assert got["generate"] == no_effect.format("4-2")
    assert got["generate_again"] == got["generate"]  # a refused mask is never taken as proven
    assert got["plain_tokens"] == 4  # the plain model needs no gate
    assert got["start_check"] == no_effect.format("29-0")
    assert got["start_check_decode_dead"] == no_effect.format("29-0").replace("prefill", "decode")
    assert got["from_config"] == no_effect.format("29-0") and got["closed_on_refusal"]
    assert all("\n" not in got[k] for k in ("generate", "start_check", "start_check_decode_dead", "from_config"))
