"""`retmask study`: the pre-registered outcome is computed as registered, whatever the numbers are."""

import random

import pytest
from support import assert_user_error, retmask

from jobs.study import ARMS, STAGES, StudyConfig
from jobs.study_report import outcome, paired


def results_with(scores: dict[str, list[float]], cells=(("qa", 1000), ("niah_single", 2000))) -> dict:
    """An eval results dict holding only what the report reads: per-sample scores of every checkpoint."""
    n = len(next(iter(scores.values())))
    return {"samples": [{"task": cells[i % len(cells)][0], "length": cells[i % len(cells)][1],
                         "outputs": {name: {"score": s[i]} for name, s in scores.items()}} for i in range(n)]}


def test_the_primary_difference_takes_the_control_as_its_baseline():
    rng = random.Random(0)
    base = [float(rng.random() < 0.5) for _ in range(200)]
    retmask_scores = [1.0 if i % 4 == 0 else s for i, s in enumerate(base)]  # fixes a quarter of the samples
    result = paired(results_with({"control": base, "retmask": retmask_scores, "base": base}),
                    ["control", "retmask", "base"], replicates=500)
    diff = result["paired"]["retmask"]
    assert diff["vs"] == "control"
    assert diff["overall"]["mean"] == pytest.approx((sum(retmask_scores) - sum(base)) / 200, abs=0.02)
    assert outcome(diff) == "positive"


@pytest.mark.parametrize("shift, word", [(0.0, "null"), (-1.0, "negative")])
def test_a_null_or_negative_result_is_called_what_it_is(shift, word):
    rng = random.Random(1)
    control = [float(rng.random() < 0.6) for _ in range(200)]
    retmask_scores = [0.0 if (shift and i % 3 == 0) else s for i, s in enumerate(control)]
    diff = paired(results_with({"control": control, "retmask": retmask_scores, "base": control}),
                  ["control", "retmask", "base"], replicates=500)["paired"]["retmask"]
    assert outcome(diff) == word


def test_both_arms_share_every_setting_but_the_rejected_variant():
    assert ARMS == {"retmask": "retrieval_masked", "control": "random_masked"}
    names = [s.name for s in STAGES]
    # calibration precedes every trained model; the head maps come after both arms are trained
    assert names.index("calibrate") < names.index("train-retmask") < names.index("train-control") < names.index("eval")
    assert names[-1] == "heads" and {"detect-retmask", "detect-control"} <= set(names)
    assert StudyConfig().study_samples == 480 and StudyConfig().max_steps == 60


def test_study_follows_the_run_contract(tmp_path):
    result = retmask("study", "--nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert_user_error(retmask("study", "--config", str(tmp_path / "missing.yaml")), "missing.yaml", "does not exist")
    (tmp_path / "s.yaml").write_text("max_steps: many\n")
    assert_user_error(retmask("study", "--config", str(tmp_path / "s.yaml")), "max_steps")


def test_results_name_every_setting_that_is_not_the_pre_registered_one(tmp_path):
    from jobs.study_report import _settings

    assert not any("Not the pre-registered" in line for line in _settings(StudyConfig(out=str(tmp_path)), tmp_path))
    text = "\n".join(_settings(StudyConfig(out=str(tmp_path), max_steps=2, repeats=1), tmp_path))
    assert "Not the pre-registered settings" in text and "`max_steps` 60 -> 2" in text and "`repeats` 2 -> 1" in text
    assert (tmp_path / "study_config.yaml").exists()


def test_results_list_every_plot_and_say_which_one_is_missing(tmp_path):
    from jobs.study_report import PLOTS, _plots

    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "shift.png").write_bytes(b"png")
    lines = [line for line in _plots(tmp_path) if line.startswith("- ")]
    assert len(lines) == len(PLOTS)
    assert all(("missing" in line) != ("heads/shift.png" in line) for line in lines)
