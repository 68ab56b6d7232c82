"""Score shift: how each trained model's retrieval scores moved against the base model's (the study's mechanism)."""

import json

import pytest

from retrieval_heads.errors import RetmaskError
from retrieval_heads.scores import HeadScores
from retrieval_heads.shift import format_shift, plot_shift, score_shift


def scores(means: dict, source: str) -> HeadScores:
    return HeadScores({head: [value] for head, value in means.items()}, source=source)


# 3 layers x 4 heads; base retrieval heads (>= 0.1): 0-0, 1-2, 2-1
BASE_MEANS = {(l, h): 0.0 for l in range(3) for h in range(4)}
BASE_MEANS.update({(0, 0): 0.6, (1, 2): 0.4, (2, 1): 0.2, (2, 3): 0.05, (0, 1): 0.02})
BASE = scores(BASE_MEANS, "base.json")


def moved(source: str, **changes: float) -> HeadScores:
    """The base scores with some heads set to new values: moved("t.json", h2_3=0.3) sets head 2-3 to 0.3."""
    means = dict(BASE_MEANS)
    for key, value in changes.items():
        layer, head = key[1:].split("_")
        means[(int(layer), int(head))] = value
    return scores(means, source)


def test_identical_scores_give_zero_change_full_agreement_and_no_moved_heads():
    result = score_shift(BASE, {"same": scores(BASE_MEANS, "same.json")}, k=3)
    same = result["models"]["same"]
    assert same["change"] == [[0.0] * 4 for _ in range(3)]
    assert same["total_change"] == 0.0 and same["layer_mass"]["change"] == [0.0, 0.0, 0.0]
    assert same["spearman"] == pytest.approx(1.0) and same["kendall_tau_b"] == pytest.approx(1.0)
    assert (same["overlap"]["shared"], same["overlap"]["fraction"]) == (3, 1.0)
    assert same["gained"] == same["lost"] == same["crossed_up"] == same["crossed_down"] == []
    assert "gained >= 0.05: none" in format_shift(result)


def test_a_head_moved_from_0_05_to_0_3_is_gained_and_crosses_the_threshold_upward():
    trained = moved("retmask.json", h2_3=0.3, h0_1=0.04)  # 0-1 moves by 0.02 only: below min_change
    result = score_shift(BASE, {"retmask": trained}, k=3)
    shift = result["models"]["retmask"]
    assert shift["change"][2][3] == pytest.approx(0.25) and shift["change"][0][1] == pytest.approx(0.02)
    assert shift["gained"] == [{"head": "2-3", "base": 0.05, "trained": 0.3, "change": pytest.approx(0.25)}]
    assert [row["head"] for row in shift["crossed_up"]] == ["2-3"]
    assert shift["lost"] == shift["crossed_down"] == []
    # 2-3 (0.3) displaces 2-1 (0.2) from the top 3
    assert shift["overlap"]["only_base"] == ["2-1"] and shift["overlap"]["only_trained"] == ["2-3"]
    report = format_shift(result)
    assert "retmask: retmask.json" in report and "2-3 0.05->0.30" in report


def test_lost_heads_and_downward_crossings_are_sorted_by_size_of_change():
    trained = moved("control.json", h0_0=0.3, h1_2=0.05, h2_1=0.12)  # -0.30, -0.35, -0.08
    shift = score_shift(BASE, {"control": trained}, k=3)["models"]["control"]
    assert [(r["head"], r["base"], r["trained"]) for r in shift["lost"]] == [
        ("1-2", 0.4, 0.05), ("0-0", 0.6, 0.3), ("2-1", 0.2, 0.12)]
    assert [r["head"] for r in shift["crossed_down"]] == ["1-2"]  # 0-0 and 2-1 stay above 0.1
    assert shift["gained"] == shift["crossed_up"] == []


def test_a_change_of_exactly_min_change_counts_despite_float_rounding():
    trained = moved("t.json", h2_1=0.25)  # 0.25 - 0.2 == 0.04999999999999999 in floats
    assert [r["head"] for r in score_shift(BASE, {"t": trained}, k=3)["models"]["t"]["gained"]] == ["2-1"]


def test_per_layer_mass_change_sums_to_the_total_change():
    trained = moved("t.json", h0_0=0.1, h1_1=0.3, h2_3=0.2, h2_0=0.07)
    shift = score_shift(BASE, {"t": trained}, k=3)["models"]["t"]
    mass = shift["layer_mass"]
    assert mass["change"] == pytest.approx([-0.5, 0.3, 0.22])
    assert sum(mass["change"]) == pytest.approx(shift["total_change"]) == pytest.approx(-0.5 + 0.3 + 0.15 + 0.07)
    assert sum(sum(row) for row in shift["change"]) == pytest.approx(shift["total_change"])
    assert [b + c for b, c in zip(mass["base"], mass["change"])] == pytest.approx(mass["trained"])


def test_every_trained_model_is_set_against_the_base_and_the_result_is_json():
    result = score_shift(BASE, {"retmask": moved("r.json", h2_3=0.3), "control": moved("c.json", h1_2=0.0)}, k=2)
    assert list(result["models"]) == ["retmask", "control"]
    assert (result["base"], result["num_layers"], result["num_heads"], result["k"]) == ("base.json", 3, 4, 2)
    assert json.loads(json.dumps(result)) == result


def test_mismatched_shapes_are_a_one_line_error_naming_both_files():
    bigger = scores({(l, h): 0.1 for l in range(4) for h in range(4)}, "bigger.json")
    with pytest.raises(RetmaskError) as err:
        score_shift(BASE, {"big": bigger}, k=3)
    message = str(err.value)
    assert "\n" not in message and "bigger.json" in message and "base.json" in message
    with pytest.raises(RetmaskError) as err:
        plot_shift(BASE, {"big": bigger}, "unused.png")
    assert "\n" not in str(err.value) and "bigger.json" in str(err.value)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(RetmaskError, match="at least one trained model"):
        score_shift(BASE, {}, k=3)
    with pytest.raises(RetmaskError, match="min_change must be a finite number above 0"):
        score_shift(BASE, {"t": BASE}, k=3, min_change=0)
    with pytest.raises(RetmaskError, match="threshold must be a finite number above 0"):
        score_shift(BASE, {"t": BASE}, k=3, threshold=0)
    with pytest.raises(RetmaskError, match="exceeds the 12 heads"):
        score_shift(BASE, {"t": BASE}, k=13)


def test_plot_shift_writes_a_png_with_base_trained_and_difference_panels(tmp_path):
    trained = {"retmask": moved("r.json", h2_3=0.3), "control": moved("c.json", h1_2=0.0)}
    path = plot_shift(BASE, trained, tmp_path / "shift.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
