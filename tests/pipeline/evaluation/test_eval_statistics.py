"""Evaluation statistics on fixed numbers: cell, task and overall means, paired bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.statistics import bootstrap_cell_means, cell_groups, interval, summarize

CELLS = [("niah_single", 1000), ("niah_single", 2000)]


def _summary(base, other, groups, num=2000):
    return summarize(np.array([base, other], dtype=float), ["base", "other"], CELLS[: max(groups) + 1],
                     np.array(groups), num=num, seed=0)


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
