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
    [("", "not readable JSON"), ("{}", "empty"), ('{"a-b": [1]}', "not 'layer-head'"), ('{"0-0": ["x"]}', "list of numbers")],
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
