"""HeadScores: Wu's JSON format, means, selection strategies and sparsity statistics."""

import json

import pytest

from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import ModelShape
from retrieval_heads.scores import HeadScores, select_heads

SHAPE = ModelShape(num_layers=4, num_heads=3, num_kv_heads=1, head_dim=8, max_position_embeddings=512)


def published_file(tmp_path):
    """A file in the exact format of the published score files (Wu et al., RetMask)."""
    data = {f"{l}-{h}": [0.0, 0.0] for l in range(4) for h in range(3)}
    data["2-1"] = [0.9, 0.7]
    data["3-0"] = [0.4, 0.0]
    data["1-2"] = [0.1, 0.1]
    data["0-0"] = [0.05, 0.0]
    path = tmp_path / "published.json"
    path.write_text(json.dumps(data))
    return path


def test_published_format_round_trips_unchanged(tmp_path):
    path = published_file(tmp_path)
    scores = HeadScores.load(path)
    out = tmp_path / "again.json"
    scores.save(out)
    assert json.loads(out.read_text()) == json.loads(path.read_text())


def test_head_score_is_mean_over_counted_trials(tmp_path):
    means = HeadScores.load(published_file(tmp_path)).mean()
    assert means[(2, 1)] == pytest.approx(0.8)
    assert means[(3, 0)] == pytest.approx(0.2)
    assert means[(0, 1)] == 0.0


def test_threshold_selects_heads_at_or_above_it(tmp_path):
    scores = HeadScores.load(published_file(tmp_path))
    assert select_heads(scores, "threshold", threshold=0.1) == [(1, 2), (2, 1), (3, 0)]


def test_top_k_takes_the_best_heads(tmp_path):
    scores = HeadScores.load(published_file(tmp_path))
    assert select_heads(scores, "top_k", k=2) == [(2, 1), (3, 0)]


def test_random_nonretrieval_excludes_retrieval_heads_and_is_seeded(tmp_path):
    scores = HeadScores.load(published_file(tmp_path))
    top = select_heads(scores, "top_k", k=3)
    draws = [select_heads(scores, "random_nonretrieval", k=3, seed=s) for s in range(20)]
    for heads in draws:
        assert not set(heads) & set(top)
        assert len(set(heads)) == 3
    assert draws[0] == select_heads(scores, "random_nonretrieval", k=3, seed=0)
    assert len({tuple(d) for d in draws}) > 1


def test_random_all_draws_from_every_head_with_a_seed(tmp_path):
    scores = HeadScores.load(published_file(tmp_path))
    a = select_heads(scores, "random_all", k=4, seed=7)
    assert a == select_heads(scores, "random_all", k=4, seed=7)
    drawn = {h for s in range(200) for h in select_heads(scores, "random_all", k=4, seed=s)}
    assert drawn == set(scores.heads)


def test_sparsity_of_a_single_retrieval_head():
    trials = {(l, h): [0.0] for l in range(4) for h in range(5)}
    trials[(1, 1)] = [1.0]
    stats = HeadScores(trials).sparsity()
    assert stats["share_above_threshold"] == pytest.approx(1 / 20)
    assert stats["gini"] == pytest.approx(19 / 20)
    assert stats["top5pct_mass"] == pytest.approx(1.0)
    assert stats["entropy"] == pytest.approx(0.0)


def test_uniform_scores_are_not_sparse():
    stats = HeadScores({(l, 0): [0.5] for l in range(10)}).sparsity()
    assert stats["gini"] == pytest.approx(0.0)
    assert stats["entropy"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "content, message",
    [("", "not readable JSON"), ("{}", "empty"), ('{"a-b": [1]}', "not 'layer-head'"),
     ('{"0-0": {"a": 1}}', "list of numbers"), ('{"\u00b2-0": [1]}', "not 'layer-head'"),
     ('{"1-2": [1], "01-2": [1]}', "head 1-2 appears twice")],
)
def test_bad_score_files_raise_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(RetmaskError, match=message):
        HeadScores.load(path)


def test_missing_score_file_says_how_to_make_one(tmp_path):
    with pytest.raises(RetmaskError, match="retmask detect"):
        HeadScores.load(tmp_path / "nope.json")


def test_score_file_for_another_model_shape_is_refused(tmp_path):
    scores = HeadScores.load(published_file(tmp_path))
    scores.check_shape(SHAPE)
    with pytest.raises(RetmaskError, match="outside this model"):
        scores.check_shape(ModelShape(3, 3, 1, 8, 512))
    with pytest.raises(RetmaskError, match="has 12 heads but the model has 20"):
        scores.check_shape(ModelShape(4, 5, 1, 8, 512))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", '"0.5"', "true", "null", "[0.5]"])
def test_a_score_that_is_not_a_finite_number_is_refused_naming_the_head_and_the_file(tmp_path, literal):
    # Python's json module reads NaN/Infinity literals and 1e999 as floats: they must not reach the means
    path = tmp_path / "scores.json"
    path.write_text('{"0-0": [0.1, 0.2], "2-1": [0.3, %s]}' % literal)
    with pytest.raises(RetmaskError, match=r"scores\.json: head '2-1' score 1 is .* not a finite number") as err:
        HeadScores.load(path)
    assert "\n" not in str(err.value)


def test_a_bare_number_is_one_trial_but_a_bare_bool_is_not_a_score(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text('{"0-0": 0.5, "0-1": 1}')
    assert HeadScores.load(path).trials == {(0, 0): [0.5], (0, 1): [1.0]}
    path.write_text('{"0-0": true}')
    with pytest.raises(RetmaskError, match="'0-0' must be a list of numbers, got true"):
        HeadScores.load(path)


def test_an_empty_score_list_is_refused_when_loading(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text('{"0-0": [0.5], "1-2": []}')
    with pytest.raises(RetmaskError, match=r"scores\.json: head '1-2' has an empty score list"):
        HeadScores.load(path)


@pytest.mark.parametrize("strategy", ["threshold", "top_k", "random_nonretrieval", "random_all"])
def test_every_strategy_refuses_scores_with_an_empty_head(strategy):
    scores = HeadScores({(0, 0): [0.9], (0, 1): [0.2], (1, 0): [], (1, 1): [0.0]}, source="mem.json")
    with pytest.raises(RetmaskError, match="head 1-0 in mem.json has no scores"):
        select_heads(scores, strategy, threshold=0.1, k=1)


@pytest.mark.parametrize("strategy", ["top_k", "random_nonretrieval", "random_all"])
@pytest.mark.parametrize("k", [0, -1, 13, True, 2.5, "2", None])
def test_k_must_be_between_one_and_the_number_of_heads(tmp_path, strategy, k):
    scores = HeadScores.load(published_file(tmp_path))  # 12 heads
    with pytest.raises(RetmaskError, match=r"k must be a whole number from 1 to 12 \(the heads in .*published\.json\)"):
        select_heads(scores, strategy, k=k)


def test_k_at_the_bounds_is_accepted(tmp_path):
    scores = HeadScores.load(published_file(tmp_path))
    assert len(select_heads(scores, "top_k", k=12)) == 12
    assert len(select_heads(scores, "random_all", k=12)) == 12
    assert len(select_heads(scores, "random_nonretrieval", k=1)) == 1


@pytest.mark.parametrize("threshold", [0, 0.0, -0.1, float("nan"), float("inf"), "0.1", True, None])
def test_threshold_must_be_a_finite_number_above_zero(tmp_path, threshold):
    scores = HeadScores.load(published_file(tmp_path))
    with pytest.raises(RetmaskError, match="threshold must be a finite number above 0"):
        select_heads(scores, "threshold", threshold=threshold)


def test_each_strategy_checks_only_its_own_parameters(tmp_path):
    # the CLI passes both threshold and k whatever the strategy; the unused one must not be judged
    scores = HeadScores.load(published_file(tmp_path))
    assert select_heads(scores, "threshold", threshold=0.1, k=0) == [(1, 2), (2, 1), (3, 0)]
    assert select_heads(scores, "top_k", threshold=0, k=2) == [(2, 1), (3, 0)]
