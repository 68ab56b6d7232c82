"""`retmask heads compare`: overlap@k, rank correlation, score mass per layer, one-sided heads and the heatmap."""

import json
from pathlib import Path

import pytest
from support import assert_user_error, retmask

from retrieval_heads.compare import compare, compare_many, format_compare, plot_compare
from retrieval_heads.errors import RetmaskError
from retrieval_heads.scores import HeadScores

DATA = Path(__file__).resolve().parents[1] / "data" / "head_scores"
DUO_RUN = DATA / "duoattention" / "Tiny-Llama" / "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"


def scores(means: dict, source: str) -> HeadScores:
    return HeadScores({head: [value] for head, value in means.items()}, source=source)


# A ranks 0-0 > 0-1 > 1-0 > 1-1; B ranks 0-1 > 0-0 > 1-1 > 1-0: two adjacent swaps.
A = scores({(0, 0): 0.9, (0, 1): 0.5, (1, 0): 0.2, (1, 1): 0.0}, "a.json")
B = scores({(0, 0): 0.1, (0, 1): 0.8, (1, 0): 0.03, (1, 1): 0.05}, "b.json")


def test_two_known_files_give_the_hand_computed_overlap_and_correlations():
    result = compare(A, B, ks=(1, 2))
    # rank differences 1, 1, 1, 1: rho = 1 - 6 * 4 / (4 * 15) = 0.6; 4 concordant, 2 discordant pairs: tau = 2/6
    assert result["spearman"] == pytest.approx(0.6)
    assert result["kendall_tau_b"] == pytest.approx(1 / 3)
    top1, top2 = result["overlap"]
    assert (top1["shared"], top1["only_a"], top1["only_b"]) == (0, ["0-0"], ["0-1"])
    assert (top2["shared"], top2["fraction"], top2["only_a"], top2["only_b"]) == (2, 1.0, [], [])
    assert result["layer_mass"]["a"] == pytest.approx([1.4 / 1.6, 0.2 / 1.6])
    assert result["layer_mass"]["b"] == pytest.approx([0.9 / 0.98, 0.08 / 0.98])


def test_a_file_against_itself_agrees_fully_and_ties_get_average_ranks():
    tied = scores({(0, 0): 1.0, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 0.5}, "tied.json")
    result = compare(tied, tied, ks=(2,))
    assert result["spearman"] == pytest.approx(1.0) and result["kendall_tau_b"] == pytest.approx(1.0)
    assert result["overlap"][0]["shared"] == 2
    reversed_ = scores({(0, 0): 0.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 0.5}, "rev.json")
    assert compare(tied, reversed_, ks=(2,))["spearman"] == pytest.approx(-1.0)


def test_a_constant_file_has_no_rank_correlation_and_says_so():
    flat = scores({h: 0.0 for h in A.trials}, "flat.json")
    result = compare(A, flat, ks=(2,))
    assert result["spearman"] is None and result["kendall_tau_b"] is None
    assert result["overlap"][0]["cut_in_tie"] == {"a": False, "b": True}
    assert "undefined" in format_compare(compare_many([A, flat], ks=(2,)))


def test_files_of_different_shapes_are_refused_in_one_line():
    bigger = scores({(l, h): 0.1 for l in range(2) for h in range(3)}, "big.json")
    with pytest.raises(RetmaskError) as err:
        compare(A, bigger)
    message = str(err.value)
    assert "\n" not in message and "big.json (6 heads, 2 layers x 3 heads)" in message and "a.json" in message


def test_k_larger_than_the_heads_is_dropped_and_no_valid_k_is_an_error():
    assert [row["k"] for row in compare(A, B, ks=(1, 10))["overlap"]] == [1]
    with pytest.raises(RetmaskError, match="exceeds the 4 heads"):
        compare(A, B, ks=(5, 10))


def test_more_than_two_files_are_each_compared_with_the_first():
    result = compare_many([A, B, A], ks=(1,))
    assert result["reference"] == "a.json"
    assert [(c["a"], c["b"]) for c in result["comparisons"]] == [("a.json", "b.json"), ("a.json", "a.json")]
    assert [c["overlap"][0]["shared"] for c in result["comparisons"]] == [0, 1]


def test_side_by_side_heatmap_png_is_written(tmp_path):
    path = plot_compare([A, B], tmp_path / "compare.png", k=1)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_compare_prints_the_table_and_writes_json_and_png(tmp_path):
    result = retmask("heads", "compare", str(DATA / "wu_tiny.json"), str(DATA / "qrhead_detection.json"),
                     "--k", "5,10", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "compare.json").read_text())
    # Wu's top 5: 2-1, 3-0, 1-3, 0-2, 3-3; QRHead's: 2-1, 1-3, 3-2, 0-0, 3-0
    five = report["comparisons"][0]["overlap"][0]
    assert (five["k"], five["shared"], five["only_a"], five["only_b"]) == (5, 3, ["0-2", "3-3"], ["3-2", "0-0"])
    assert "Spearman" in result.stdout and "3/5" in result.stdout
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_compare_mixes_formats_with_a_shape_for_duoattention(tmp_path):
    result = retmask("heads", "compare", str(DATA / "wu_tiny.json"), str(DUO_RUN), "--shape", "4x4x2",
                     "--quantile", "0.5", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "compare.json").read_text())["comparisons"]) == 1


def test_cli_compare_shape_mismatch_is_one_line_exit_1(tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"0-0": [0.5], "0-1": [0.0], "1-0": [0.1], "1-1": [0.0]}))
    result = retmask("heads", "compare", str(DATA / "wu_tiny.json"), str(small), "--out", str(tmp_path / "out"))
    assert_user_error(result, "cannot compare", "same shape")
    assert not (tmp_path / "out" / "compare.json").exists()
