"""Head scores in other methods' published formats import into HeadScores with the heads those files name."""

import json
from pathlib import Path

import pytest
from support import assert_user_error, retmask

from retrieval_heads.errors import RetmaskError
from retrieval_heads.importers import FORMATS, load_head_scores, resolve_format
from retrieval_heads.models import ModelShape
from retrieval_heads.preflight import MIN_COUNTED_TRIALS, preflight
from retrieval_heads.scores import HeadScores, select_heads

DATA = Path(__file__).resolve().parents[1] / "data" / "head_scores"
DUO_RUN = DATA / "duoattention" / "Tiny-Llama" / "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"
SHAPE = ModelShape(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)


def top(scores: HeadScores, k: int) -> list[str]:
    return [f"{l}-{h}" for (l, h), _ in scores.ranked()[:k]]


def test_wu_fixture_imports_unchanged_with_its_trials():
    scores = load_head_scores(DATA / "wu_tiny.json", shape=SHAPE)
    assert scores.trials == HeadScores.load(DATA / "wu_tiny.json").trials
    assert scores.mean()[(2, 1)] == pytest.approx(0.8) and scores.mean()[(1, 3)] == pytest.approx(0.2)
    assert top(scores, 3) == ["2-1", "3-0", "1-3"]


def test_qrhead_detection_output_keeps_every_heads_qrscore():
    scores = load_head_scores(DATA / "qrhead_detection.json")  # a full grid with scores needs no shape
    assert len(scores.trials) == 16
    assert scores.trials[(2, 1)] == [1.84] and scores.trials[(0, 2)] == [-0.15]
    assert top(scores, 3) == ["2-1", "1-3", "3-2"]


def test_qrhead_head_set_maps_ranks_to_scores_that_threshold_and_top_k_select_exactly():
    scores = load_head_scores(DATA / "qrhead_config.yaml", shape=SHAPE)
    means = scores.mean()
    assert [means[h] for h in [(2, 1), (1, 3), (3, 2), (0, 0)]] == pytest.approx([1.0, 0.775, 0.55, 0.325])
    assert sum(1 for v in means.values() if v == 0.0) == 12
    listed = [(0, 0), (1, 3), (2, 1), (3, 2)]
    assert select_heads(scores, "top_k", k=4) == select_heads(scores, "threshold", threshold=0.1) == listed


@pytest.mark.parametrize("text", ['"2-1,1-3,3-2,0-0"', '["2-1", "1-3", "3-2", "0-0"]',
                                  "[[2, 1], [1, 3], [3, 2], [0, 0]]"])
def test_qrhead_head_set_reads_the_same_from_text_or_json_lists(tmp_path, text):
    path = tmp_path / "heads.txt"
    path.write_text(json.loads(text) if text.startswith('"') else text)
    scores = load_head_scores(path, "auto", shape=SHAPE)
    assert scores.trials == load_head_scores(DATA / "qrhead_config.yaml", shape=SHAPE).trials


def test_qrhead_head_set_without_a_shape_asks_for_the_model():
    with pytest.raises(RetmaskError, match="pass --model"):
        load_head_scores(DATA / "qrhead_config.yaml")


def test_qrhead_head_outside_the_model_is_refused(tmp_path):
    path = tmp_path / "heads.txt"
    path.write_text("2-1,9-0")
    with pytest.raises(RetmaskError, match="head 9-0, outside this model's 4 layers x 4 heads"):
        load_head_scores(path, "qrhead", shape=SHAPE)


def test_duoattention_gates_spread_over_their_query_heads_and_keep_the_top_half():
    scores = load_head_scores(DUO_RUN, shape=SHAPE)  # the run directory, as DuoAttention publishes it
    retrieval = {h for h, v in scores.mean().items() if v > 0}
    assert retrieval == {(0, 2), (0, 3), (1, 0), (1, 1), (2, 2), (2, 3), (3, 0), (3, 1)}
    assert scores.mean()[(1, 0)] == scores.mean()[(1, 1)] == 1.0  # one KV gate, both query heads of its group
    assert scores.mean()[(3, 0)] == pytest.approx(0.60546875)
    assert select_heads(scores, "threshold", threshold=0.1) == sorted(retrieval)


def test_duoattention_quantile_option_moves_the_cutoff():
    tsv = DUO_RUN / "full_attention_heads.tsv"
    every = load_head_scores(tsv, "duoattention", shape=SHAPE, quantile=0.0)
    assert sum(1 for v in every.mean().values() if v > 0) == 14  # every gate kept; one KV gate is exactly 0
    strict = load_head_scores(tsv, "duoattention", shape=SHAPE, quantile=0.8)
    assert {h for h, v in strict.mean().items() if v > 0} == {(0, 2), (0, 3), (1, 0), (1, 1)}


def test_duoattention_needs_the_gqa_grouping_and_a_matching_shape():
    with pytest.raises(RetmaskError, match="GQA grouping: pass --model"):
        load_head_scores(DUO_RUN)
    other = ModelShape(num_layers=4, num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=512)
    with pytest.raises(RetmaskError, match="4 layers x 2 KV heads but the model has 4 x 4"):
        load_head_scores(DUO_RUN, shape=other)


def test_duoattention_bad_cell_names_its_row_and_column(tmp_path):
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text("0.5\t0.25\n0.5\tnan\n")
    with pytest.raises(RetmaskError, match="row 2 column 1 is 'nan'"):
        load_head_scores(path, shape=ModelShape(2, 2, 2, 8, 512))


def test_auto_detects_each_fixture_by_content():
    assert resolve_format(DATA / "wu_tiny.json") == "wu"
    assert resolve_format(DATA / "qrhead_detection.json") == "qrhead"
    assert resolve_format(DATA / "qrhead_config.yaml") == "qrhead"
    assert resolve_format(DUO_RUN) == "duoattention"
    assert resolve_format(DUO_RUN / "full_attention_heads.tsv") == "duoattention"


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(RetmaskError) as err:
        load_head_scores(DATA / "wu_tiny.json", "headkv")
    assert "unknown head-score format 'headkv'" in str(err.value)
    for name in FORMATS:
        assert name in str(err.value)


def test_option_of_another_format_is_refused():
    with pytest.raises(RetmaskError, match="option quantile does not apply to head-score format wu"):
        load_head_scores(DATA / "wu_tiny.json", quantile=0.5)


def test_content_of_no_known_format_asks_for_format(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("layer,head,score\n0,1,0.5\n")
    with pytest.raises(RetmaskError, match="cannot tell the format .* pass --format"):
        load_head_scores(path)


def test_preflight_of_a_few_trial_wu_file_warns_about_trials_and_counts_them():
    report = preflight(load_head_scores(DATA / "wu_tiny.json"))
    assert report["counted_trials"] == {"min": 3, "median": 3.0, "max": 3}
    assert report["heads_selected"] == 3  # 2-1, 3-0, 1-3 reach 0.1
    assert any(f"< {MIN_COUNTED_TRIALS}" in w for w in report["warnings"])


def test_preflight_of_an_imported_aggregate_says_trials_do_not_apply():
    report = preflight(load_head_scores(DUO_RUN, shape=SHAPE), per_trial=FORMATS["duoattention"].per_trial)
    assert report["counted_trials"] is None and report["heads_selected"] == 8
    assert not report["warnings"] and "not Wu retrieval scores" in report["notes"][0]


def test_preflight_warns_when_scores_are_less_sparse_than_the_weakest_responder():
    flat = HeadScores({(l, h): [0.3] * 60 for l in range(4) for h in range(4)})
    report = preflight(flat)
    assert report["gini"] == pytest.approx(0.0)
    assert any("less sparse" in w and "Olmo-3-7B-Think" in w for w in report["warnings"])
    assert not any("counted trials" in w for w in report["warnings"])


def test_detect_summary_json_carries_the_preflight_report(tmp_path):
    from retrieval_heads.detect import DetectConfig, TrialRecord, write_outputs

    def trial(counted, scores):
        return TrialRecord(length=500, depth=0.5, needle=0, prompt_ids=[1, 2], answer_span=(0, 1), generated_ids=[2],
                           response="x", rouge1_recall=1.0 if counted else 0.0, counted=counted, head_scores=scores)

    records = [trial(True, {"1-0": 0.5}), trial(True, {"1-0": 0.3, "0-1": 0.2}), trial(False, {"0-0": 1.0})]
    write_outputs(DetectConfig(model="tiny"), records, 2, 2, tmp_path)
    report = json.loads((tmp_path / "summary.json").read_text())["preflight"]
    assert report["counted_trials"] == {"min": 2, "median": 2.0, "max": 2}
    assert report["heads_selected"] == 2 and any("counted trials" in w for w in report["warnings"])


def test_detect_command_prints_the_preflight_report(tmp_path, monkeypatch, capsys):
    import jobs.detect
    from jobs.cli import detect

    monkeypatch.setattr(jobs.detect, "run", lambda config, out: HeadScores.load(DATA / "wu_tiny.json"))
    detect(config=None, out=str(tmp_path), model="tiny", lengths="500", depths="0.5", num_needles=1,
           max_new_tokens=8)
    printed = capsys.readouterr().out
    assert "pre-flight" in printed and "counted trials per head 3 (min)" in printed and "warning:" in printed


def test_cli_import_writes_wu_json_and_prints_the_preflight(tmp_path):
    out = tmp_path / "imported" / "head_scores.json"
    result = retmask("heads", "import", str(DUO_RUN), "--shape", "4x4x2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "pre-flight" in result.stdout and "8 of 16 heads" in result.stdout
    imported = HeadScores.load(out)
    assert imported.trials == load_head_scores(DUO_RUN, shape=SHAPE).trials
    assert not list(out.parent.glob(".*.tmp*"))


def test_cli_import_takes_the_shape_from_model_config(tmp_path):
    config = {"model_type": "llama", "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 32, "intermediate_size": 64, "vocab_size": 128}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "qr.json"
    model = str(tmp_path / "model")
    result = retmask("heads", "import", str(DATA / "qrhead_config.yaml"), "--model", model, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert HeadScores.load(out).trials[(1, 3)] == [pytest.approx(0.775)]


def test_cli_unknown_format_is_one_line_exit_1(tmp_path):
    out = str(tmp_path / "x.json")
    result = retmask("heads", "import", str(DATA / "wu_tiny.json"), "--format", "headkv", "--out", out)
    line = assert_user_error(result)
    assert "unknown head-score format 'headkv'" in line and "duoattention, qrhead, wu" in line
    assert not (tmp_path / "x.json").exists()


def test_cli_preflight_prints_warnings_and_exits_0():
    result = retmask("heads", "preflight", str(DATA / "wu_tiny.json"))
    assert result.returncode == 0, result.stderr
    assert "counted trials per head 3 (min)" in result.stdout and "warning:" in result.stdout
