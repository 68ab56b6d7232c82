"""The continuous-batching model behind bench/sim_batching.py: schedules, step counts, preemption, tail fit."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.shard_schema import make_row
from pipeline.shard_writer import open_run

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sim_batching.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("sim_batching", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_batching"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules["sim_batching"]


def unlimited(sim, seqs: int, prefill: int = 0):
    return sim.Engine(max_num_seqs=seqs, kv_tokens=10 ** 9, prefill_budget=prefill)


def run_all(sim, engine, prompt, lengths, batch):
    """Every schedule's Run for prompts x variants answer lengths."""
    n, v = lengths.shape
    calls = sim.schedules(n, v, batch)
    return {name: sim.run_schedule(engine, np.repeat(prompt, v), lengths.reshape(-1), c) for name, c in calls.items()}


def test_equal_answers_cost_the_same_mixed_or_switched_when_each_switched_call_fills_the_engine(sim):
    prompt, lengths = np.full(32, 20), np.full((32, 3), 10)
    runs = run_all(sim, unlimited(sim, seqs=8), prompt, lengths, batch=16)  # P = 2 x max_num_seqs
    assert runs["switched"].steps == runs["batch-mixed"].steps == runs["mixed"].steps == 32 * 3 // 8 * 10
    assert runs["switched"].flat == runs["mixed"].flat == 120


def test_a_batch_smaller_than_the_engine_leaves_slots_idle_when_switched(sim):
    # P x variants = 12 fits the 12 slots: switched runs 4 of them per call, three calls per batch.
    prompt, lengths = np.full(8, 20), np.full((8, 3), 10)
    runs = run_all(sim, unlimited(sim, seqs=12), prompt, lengths, batch=4)
    assert runs["switched"].steps == 2 * 3 * 10
    assert runs["batch-mixed"].steps == runs["mixed"].steps == 2 * 10
    assert runs["switched"].seq_steps / runs["switched"].steps == 4
    assert runs["mixed"].seq_steps / runs["mixed"].steps == 12


def test_one_long_answer_per_batch_makes_switched_slower_than_mixed(sim):
    lengths = np.full((64, 2), 5)
    lengths[::8, :] = 50  # one long answer per batch of 8 prompts and variant
    runs = run_all(sim, unlimited(sim, seqs=8), np.full(64, 20), lengths, batch=8)
    assert runs["switched"].steps == 8 * 2 * 50  # every call drains to its long answer
    assert runs["mixed"].steps < runs["switched"].steps / 2
    assert runs["mixed"].tokens == runs["switched"].tokens == lengths.sum()


@pytest.mark.parametrize("engine", [
    dict(max_num_seqs=16, kv_tokens=10 ** 9, prefill_budget=0),
    dict(max_num_seqs=16, kv_tokens=10 ** 9, prefill_budget=64),
    dict(max_num_seqs=16, kv_tokens=400, prefill_budget=64),
], ids=["prefill-ignored", "chunked-prefill", "kv-bound"])
def test_steps_are_never_fewer_than_the_tokens_over_the_slots_and_every_token_is_generated(sim, engine):
    rng = np.random.default_rng(3)
    prompt, lengths = rng.integers(1, 60, 48), rng.integers(1, 120, (48, 3))
    for name, run in run_all(sim, sim.Engine(**engine), prompt, lengths, batch=16).items():
        assert run.tokens == lengths.sum(), name
        assert run.steps >= math.ceil(lengths.sum() / 16) and run.steps >= lengths.max(), name
        assert run.flat >= run.steps and run.kv_read >= run.flat, name
        assert run.peak_kv <= engine["kv_tokens"], name


def test_a_full_kv_cache_preempts_the_last_admitted_and_still_finishes_every_request(sim):
    prompt, lengths = np.full(8, 5), np.arange(1, 9) * 3
    roomy = sim.simulate(sim.Engine(max_num_seqs=4, kv_tokens=10 ** 6, prefill_budget=16), prompt, lengths, range(8))
    tight = sim.simulate(sim.Engine(max_num_seqs=4, kv_tokens=40, prefill_budget=16), prompt, lengths, range(8))
    assert roomy.preemptions == 0 and tight.preemptions > 0 and tight.peak_kv <= 40 < roomy.peak_kv
    assert roomy.tokens == tight.tokens == lengths.sum()
    assert tight.steps > roomy.steps  # recomputed prefills and fewer requests at once
    with pytest.raises(ValueError, match="KV tokens"):
        sim.simulate(sim.Engine(kv_tokens=20), prompt, lengths, range(8))  # one request alone does not fit


def test_prefill_beyond_the_knee_costs_more_than_a_decode_step(sim):
    engine = sim.Engine(max_num_seqs=4, kv_tokens=10 ** 6, prefill_budget=1000, knee=100, kv_read=0.0)
    run = sim.simulate(engine, np.full(4, 200), np.full(4, 10), range(4))
    # step 1: 800 prompt tokens at once (8 t_step, first token each); then 9 decode steps of 1 t_step
    assert run.steps == 10 and run.flat == pytest.approx(8 + 9)


def test_censored_fit_recovers_a_lognormal_from_answers_cut_at_the_cap(sim):
    rng = np.random.default_rng(0)
    true = np.exp(math.log(300) + 1.0 * rng.standard_normal(3000))
    cut = true >= 256
    mu, sigma = sim.fit_lognormal_censored(np.minimum(true, 256), cut)
    assert 0.4 < cut.mean() < 0.6
    assert mu == pytest.approx(math.log(300), abs=0.1) and sigma == pytest.approx(1.0, abs=0.1)
    mu_fixed, sigma_fixed = sim.fit_lognormal_censored(np.minimum(true, 256), cut, sigma=1.0)
    assert sigma_fixed == 1.0 and mu_fixed == pytest.approx(math.log(300), abs=0.1)
    naive, _ = sim.fit_lognormal_censored(np.minimum(true, 256), np.zeros_like(cut))
    assert naive < math.log(300) - 0.3  # reading truncated answers as finished would shorten the tail


def test_measured_lengths_come_from_a_real_output_and_only_truncated_answers_grow(sim, tmp_path):
    out = tmp_path / "out"
    config = {"model": {"id": "m", "path": "/m", "hash": "sha256:0"}, "masks": {}, "seed": 0, "packages": {},
              "sampling": {"max_tokens": 64}}
    writer = open_run(out, config, ["normal", "retrieval_masked"])
    writer.write_shard([make_row(f"p{i}", "q", 0, 30 + i, {"normal": ("a", 10 + i, "stop"),
                                                          "retrieval_masked": ("b", 64, "length")})
                        for i in range(30)])
    writer.close()
    m = sim.load_measured(str(out), tail_sigma=1.0)
    assert m.cap == 64 and m.variants == ["normal", "retrieval_masked"]
    assert m.truncated[:, 0].sum() == 0 and m.truncated[:, 1].all()
    assert m.fits["normal"][2] and not m.fits["retrieval_masked"][2]  # no stop: sigma is the stated one
    prompt, lengths = sim.sample_measured(m, 500, 2048, True, np.random.default_rng(0))
    assert set(prompt) <= set(range(30, 60)) and set(lengths[:, 0]) <= set(range(10, 40))
    assert lengths[:, 1].min() >= 64 and lengths[:, 1].max() <= 2048 and (lengths[:, 1] > 64).mean() > 0.9
    _, replayed = sim.sample_measured(m, 500, 2048, False, np.random.default_rng(0))
    assert (replayed[:, 1] == 64).all()


def test_lengths_measured_by_bench_mixed_replay_like_an_output(sim, tmp_path):
    # the "lengths" block of bench/bench_mixed.py --json: rows are prompts, one list per variant
    record = {"variants": ["normal", "random_masked"], "max_tokens": 64, "num_prompt_tokens": list(range(30, 60)),
              "num_tokens": {"normal": list(range(10, 40)), "random_masked": [64] * 30},
              "finish_reason": {"normal": ["stop"] * 30, "random_masked": ["length"] * 30}}
    path = tmp_path / "bench_mixed.json"
    path.write_text(json.dumps({"mixed_vs_switched": {}, "lengths": record}))
    m = sim.load_lengths(str(path), tail_sigma=1.0)
    assert m.cap == 64 and m.variants == ["normal", "random_masked"] and m.lengths.shape == (30, 2)
    assert m.truncated[:, 0].sum() == 0 and m.truncated[:, 1].all()
    assert m.fits["normal"][2] and not m.fits["random_masked"][2]
    prompt, lengths = sim.sample_measured(m, 200, 2048, True, np.random.default_rng(0))
    assert set(prompt) <= set(range(30, 60)) and lengths[:, 1].min() >= 64 and (lengths[:, 1] > 64).mean() > 0.9
    path.write_text(json.dumps({"lengths": {"variants": ["normal"]}}))
    with pytest.raises(SystemExit, match="not an answer-length file"):
        sim.load_lengths(str(path), tail_sigma=1.0)


def test_write_replaces_only_its_own_section_and_says_it_is_a_model(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Other\n\nkept\n\n## Mixed vs switched batches (simulation)\n\nold\n")
    cmd = [sys.executable, str(BENCH), "--synthetic", "lognormal", "--prompts", "32", "--batch-sizes", "16",
           "--seeds", "1", "--write", str(doc)]
    subprocess.run(cmd, check=True, capture_output=True)
    text = doc.read_text()
    assert "## Other\n\nkept" in text and "\nold\n" not in text
    assert text.count("## Mixed vs switched batches (simulation)") == 1
    assert "A model, not a measurement" in text and "--prompts 32 --batch-sizes 16 --seeds 1 --write" in text
