"""Explicit eval cells and the study's pre-registered cell selection (docs/STUDY.md, Evaluation).

The study calibrates the full grid on the base model, keeps the cells where it has room, then evaluates
exactly those cells on every checkpoint: a cell's samples must be the same whatever else is in the suite.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.evaluation.calibration import read_cell_scores, select_cells
from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.fitting import EvalSample, build_suite, format_cell, parse_cells
from pipeline.evaluation.report import markdown
from pipeline.evaluation.run import _suite, build_plan
from pipeline.evaluation.statistics import cell_groups, summarize
from retrieval_heads.config import load_config
from retrieval_heads.errors import RetmaskError


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


# --- explicit cells -------------------------------------------------------------------------------


def test_explicit_cells_build_exactly_those_cells_in_their_order_with_the_requested_count(tokenizer):
    cells = ["qa@2000", "niah_single@1000", "common_words@1000"]
    suite = build_suite(tokenizer, samples_per_cell=3, seed=7, max_context=8192, cells=cells)
    assert [(s.task, s.length) for s in suite] == [("qa", 2000)] * 3 + [("niah_single", 1000)] * 3 + [
        ("common_words", 1000)] * 3
    assert [s.id for s in suite[:3]] == ["qa/2000/0", "qa/2000/1", "qa/2000/2"]
    assert cell_groups(suite)[0] == [("qa", 2000), ("niah_single", 1000), ("common_words", 1000)]
    assert all(s.num_tokens <= s.length for s in suite)


def test_a_cell_has_the_same_samples_alone_with_other_cells_and_in_the_full_grid(tokenizer):
    alone = build_suite(tokenizer, samples_per_cell=2, seed=7, cells=["niah_multikey@1000"])
    with_others = build_suite(tokenizer, samples_per_cell=2, seed=7, cells=["qa@2000", ("niah_multikey", 1000)])
    grid = build_suite(tokenizer, tasks=("niah_multikey", "qa"), lengths=(1000, 2000), samples_per_cell=2, seed=7)
    assert len(alone) == 2
    assert [s for s in with_others if s.task == "niah_multikey"] == alone
    assert [s for s in grid if (s.task, s.length) == ("niah_multikey", 1000)] == alone
    assert [s for s in grid if (s.task, s.length) == ("qa", 2000)] == [s for s in with_others if s.task == "qa"]
    other_seed = build_suite(tokenizer, samples_per_cell=2, seed=8, cells=["niah_multikey@1000"])
    assert not {s.prompt for s in other_seed} & {s.prompt for s in alone}  # the seed still decides


def test_without_cells_the_suite_is_the_full_tasks_by_lengths_grid(tokenizer):
    suite = build_suite(tokenizer, tasks=("qa", "niah_single"), lengths=(1000, 2000), samples_per_cell=1)
    assert [(s.task, s.length) for s in suite] == [("qa", 1000), ("qa", 2000), ("niah_single", 1000),
                                                   ("niah_single", 2000)]
    assert EvalConfig().cells is None


@pytest.mark.parametrize("cells, message", [
    (["niah_single"], r"cell 'niah_single' is not task@length \(e\.g\. niah_multikey@2000\)"),
    (["niah_single@"], "cell 'niah_single@' is not task@length"),
    (["@1000"], "cell '@1000' is not task@length"),
    (["niah_single@1k"], "cell 'niah_single@1k' is not task@length"),
    (["qa@-5"], "cell 'qa@-5' is not task@length"),
    (["qa@0"], "cell 'qa@0' has length 0; a length is a number of tokens >= 1"),
    (["qa@1000", "niah_singel@2000"],
     r"cell 'niah_singel@2000': unknown eval task 'niah_singel' \(did you mean niah_single\?\).*fix the cells option"),
    (["qa@1000", "qa@1000"], "cell 'qa@1000' is listed twice"),
    ([], "cells is empty"),
])
def test_a_bad_cell_is_a_one_line_error_naming_it(cells, message):
    with pytest.raises(RetmaskError, match=message) as err:
        parse_cells(cells)
    assert "\n" not in str(err.value)


def test_bad_cells_are_refused_before_the_suite_or_any_model_is_touched(tmp_path):
    class Untouchable:  # any use of the tokenizer would fail the test
        def __getattr__(self, name):
            raise AssertionError(f"tokenizer used: {name}")

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenizer called")

    with pytest.raises(RetmaskError, match="did you mean common_words"):
        build_suite(Untouchable(), samples_per_cell=1, cells=["qa@1000", "comon_words@1000"])
    config = EvalConfig(models={"base": str(tmp_path / "missing")}, cells=["qa@1000", "qa@two"])
    with pytest.raises(RetmaskError, match="cell 'qa@two' is not task@length"):
        build_plan(config)  # the model does not exist either: the cell error comes first


def test_cells_come_comma_separated_from_the_command_line(monkeypatch, capsys, tmp_path):
    import signal

    from jobs.cli import main

    assert load_config(EvalConfig, None, cells="niah_single@1000, qa@2000").cells == ["niah_single@1000", "qa@2000"]
    seen = []
    monkeypatch.setattr("jobs.eval.run", lambda config, out: seen.append(config))  # no engine: just the config
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    with pytest.raises(SystemExit) as err:
        main(["eval", "--cells", "niah_single@1000,qa@2000", "--out", str(tmp_path)])
    assert err.value.code == 0
    assert seen[0].cells == ["niah_single@1000", "qa@2000"] and seen[0].tasks == EvalConfig().tasks
    monkeypatch.setattr("jobs.eval.run", lambda config, out: build_plan(config))
    with pytest.raises(SystemExit) as err:
        main(["eval", "--cells", "niah_single@1000,qa@fast", "--models", f"base={tmp_path / 'missing'}"])
    stderr = capsys.readouterr().err
    assert err.value.code == 1 and stderr.startswith("retmask: error: cell 'qa@fast' is not task@length")
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


# --- the pre-registered selection rule ------------------------------------------------------------


def test_cells_in_10_to_90_points_are_kept_boundaries_included_in_input_order():
    scores = {("qa", 4000): 50.0, ("qa", 1000): 100.0, ("niah_single", 2000): 90.0, ("vt", 1000): 0.0,
              ("niah_single", 1000): 10.0, ("cw", 1000): 95.0, ("cw", 2000): 9.5}
    kept, branch = select_cells(scores)
    assert kept == [("qa", 4000), ("niah_single", 2000), ("niah_single", 1000)]
    assert branch == "in [10, 90]"


def test_with_fewer_than_three_in_the_band_the_unsaturated_cells_are_kept():
    scores = {("a", 1000): 100.0, ("b", 1000): 95.0, ("c", 1000): 50.0, ("d", 1000): 0.0, ("e", 1000): 5.0,
              ("f", 1000): 60.0}
    kept, branch = select_cells(scores)
    assert kept == [("b", 1000), ("c", 1000), ("e", 1000), ("f", 1000)] and branch == "in (0, 100)"


def test_with_fewer_than_three_unsaturated_cells_every_cell_is_kept():
    scores = {("a", 1000): 100.0, ("b", 1000): 0.0, ("c", 1000): 50.0, ("d", 1000): 99.0, ("e", 1000): 100.0}
    kept, branch = select_cells(scores)
    assert kept == list(scores) and branch == "all"


def test_the_band_and_the_minimum_are_parameters():
    scores = {("a", 1000): 15.0, ("b", 1000): 50.0, ("c", 1000): 85.0, ("d", 1000): 20.0}
    assert select_cells(scores, low=20, high=80, min_cells=2) == ([("b", 1000), ("d", 1000)], "in [20, 80]")
    assert select_cells(scores, low=20, high=80, min_cells=3) == (list(scores), "in (0, 100)")


# --- results.json -> the baseline's cell scores -----------------------------------------------------


def _results(tmp_path):
    """A results.json as the eval writes it, from synthetic 0-1 scores (no engine)."""
    cells = [("niah_single", 1000), ("niah_single", 2000), ("qa", 1000)]
    base = [1, 1, 1, 1] + [0.8, 1, 1, 0.8] + [0, 0, 0.5, 0]  # 100, 90 (89.99999999999999 in floats), 12.5
    trained = [1, 1, 1, 0] + [1, 1, 1, 1] + [0, 1, 1, 0]
    groups = np.repeat([0, 1, 2], 4)
    results = summarize(np.array([base, trained], dtype=float), ["base", "trained"], cells, groups, num=50)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def test_the_baseline_cell_scores_come_back_from_results_json_in_points(tmp_path):
    path = _results(tmp_path)
    assert read_cell_scores(path) == {("niah_single", 1000): 100.0, ("niah_single", 2000): 90.0, ("qa", 1000): 12.5}
    assert read_cell_scores(path, "trained") == {("niah_single", 1000): 75.0, ("niah_single", 2000): 100.0,
                                                 ("qa", 1000): 50.0}
    kept, branch = select_cells(read_cell_scores(path), min_cells=2)  # 90 stays in the band despite float noise
    assert kept == [("niah_single", 2000), ("qa", 1000)] and branch == "in [10, 90]"
    config = EvalConfig(cells=[format_cell(*c) for c in kept])
    assert parse_cells(config.cells) == kept


def test_a_file_that_is_not_an_eval_result_is_a_one_line_error(tmp_path):
    with pytest.raises(RetmaskError, match="does not exist; run retmask eval on the base model first"):
        read_cell_scores(tmp_path / "missing.json")
    with pytest.raises(RetmaskError, match="has no checkpoint 'control'; it holds base, trained"):
        read_cell_scores(_results(tmp_path), "control")
    for text in ("{not json", '{"checkpoints": {}}', '{"checkpoints": {"base": {"tasks": {"qa": {}}}}}', "[1]"):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(RetmaskError, match="not a results.json of retmask eval") as err:
            read_cell_scores(tmp_path / "bad.json")
        assert "\n" not in str(err.value)


def test_results_of_an_explicit_cell_suite_name_their_cells():
    cells = [("qa", 2000), ("niah_single", 1000), ("qa", 1000)]
    samples = [EvalSample(f"{t}/{n}/{i}", t, n, "p", ("a",), (), (), n, (0, 1), 8) for t, n in cells for i in range(2)]
    config = EvalConfig(cells=[format_cell(*c) for c in cells], samples_per_cell=2)
    suite = _suite(config, samples, cell_groups(samples)[0])
    assert suite["cells"] == ["qa@2000", "niah_single@1000", "qa@1000"]
    assert suite["tasks"] == ["qa", "niah_single"] and suite["lengths"] == [1000, 2000] and suite["num_samples"] == 6
    grid = _suite(EvalConfig(), samples, cell_groups(samples)[0])
    assert grid["tasks"] == list(EvalConfig().tasks) and grid["lengths"] == [1000, 2000, 4000]
    scores = np.ones((1, len(samples)))
    results = {"suite": suite, "models": {"base": {"path": "m"}}, "perplexity": {},
               **summarize(scores, ["base"], *cell_groups(samples), num=10)}
    assert "6 samples per checkpoint: 3 cells (qa@2000, niah_single@1000, qa@1000) x 2 " in markdown(results)
    assert [line[:14] for line in markdown(results).splitlines() if line.startswith("| qa |")] == [
        "| qa | 2000 | ", "| qa | 1000 | "]
