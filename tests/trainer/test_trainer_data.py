"""Shards -> TRL conversational pairs: filters and their counts, the held-out split, and bad inputs."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from support import RUN_CONFIG, VARIANTS, crafted_rows, pair_row
from trl.data_utils import is_conversational

from retrieval_heads.errors import RetmaskError
from trainer.data import eval_bucket, load_pairs


def mixed_rows():
    return [
        pair_row("good1", "answer one", "generic"),
        pair_row("good2", "answer two", "generic", normal_tokens=40),
        pair_row("empty1", "answer", ""),
        pair_row("empty2", "   ", "generic"),
        pair_row("empty3", None, "generic"),
        pair_row("same", "identical text", "identical text"),
        pair_row("trunc1", "long answer", "generic", normal_reason="length"),
        pair_row("trunc2", "answer", "long generic", masked_reason="length"),
        pair_row("long", "very long answer", "generic", masked_tokens=500),
    ]


def test_filters_remove_bad_pairs_and_count_each_reason(make_shards):
    pairs = load_pairs(make_shards(mixed_rows()), eval_fraction=0.0, max_response_tokens=100)
    assert pairs.stats["rows"] == 9
    assert pairs.stats["removed"] == {"empty": 3, "identical": 1, "truncated": 2, "too_long": 1}
    assert pairs.stats["pairs"] == pairs.stats["train"] == 2
    assert sorted(pairs.train["prompt_id"]) == ["good1", "good2"]
    assert pairs.eval is None


def test_pairs_are_in_trl_conversational_format(make_shards):
    pairs = load_pairs(make_shards(mixed_rows()), eval_fraction=0.0)
    first = pairs.train[0]
    assert first["prompt"] == [{"role": "user", "content": "question good1"}]
    assert first["chosen"] == [{"role": "assistant", "content": "answer one"}]
    assert first["rejected"] == [{"role": "assistant", "content": "generic"}]
    assert is_conversational(first)


def test_truncated_pairs_are_kept_when_asked_and_limits_are_optional(make_shards):
    pairs = load_pairs(make_shards(mixed_rows()), eval_fraction=0.0, drop_truncated=False)
    assert pairs.stats["removed"] == {"empty": 3, "identical": 1, "truncated": 0, "too_long": 0}
    assert pairs.stats["pairs"] == 5


def test_pairs_longer_than_max_length_are_counted_not_removed(make_shards):
    # num_prompt_tokens is 20: good2 (20 + 40) and long (20 + 500) exceed 50
    pairs = load_pairs(make_shards(mixed_rows()), eval_fraction=0.0, drop_truncated=False, max_length=50)
    assert pairs.stats["over_max_length"] == 2
    assert pairs.stats["prompt_over_max_length"] == 0
    short = load_pairs(make_shards(mixed_rows(), name="p2"), eval_fraction=0.0, max_length=20)
    assert short.stats["prompt_over_max_length"] == 3
    assert pairs.stats["pairs"] == 5


def test_any_two_variants_can_be_paired(make_shards):
    pairs = load_pairs(make_shards(mixed_rows()), chosen="normal", rejected="random_masked", eval_fraction=0.0)
    assert pairs.train[0]["rejected"][0]["content"].startswith("random ")
    assert pairs.stats["rejected"] == "random_masked"


def test_split_is_deterministic_by_prompt_id_and_independent_of_the_variant_pair(make_shards):
    out = make_shards(crafted_rows(200))
    a = load_pairs(out, eval_fraction=0.2)
    b = load_pairs(out, eval_fraction=0.2)
    c = load_pairs(out, rejected="random_masked", eval_fraction=0.2)
    held_out = set(a.eval["prompt_id"])
    assert held_out == set(b.eval["prompt_id"]) == set(c.eval["prompt_id"])
    assert held_out.isdisjoint(a.train["prompt_id"])
    assert len(held_out) + len(a.train) == 200
    assert 20 <= len(held_out) <= 60  # ~20% of 200
    assert all(eval_bucket(pid) < 0.2 for pid in held_out)


def test_directory_without_manifest_is_a_one_line_error(tmp_path):
    with pytest.raises(RetmaskError, match="no manifest.json"):
        load_pairs(tmp_path)


def test_unknown_schema_version_is_refused(make_shards):
    out = make_shards(mixed_rows())
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(RetmaskError, match="schema version 99"):
        load_pairs(out)


def test_missing_variant_names_the_available_ones(make_shards):
    out = make_shards(mixed_rows())
    with pytest.raises(RetmaskError, match=r"\['nope'\].*'normal', 'retrieval_masked', 'random_masked'"):
        load_pairs(out, rejected="nope")
    with pytest.raises(RetmaskError, match="both 'normal'"):
        load_pairs(out, rejected="normal")


def test_shard_missing_columns_is_named(make_shards):
    out = make_shards(mixed_rows())
    shard = out / json.loads((out / "manifest.json").read_text())["shards"][0]["file"]
    table = pq.read_table(shard)
    pq.write_table(table.drop(["retrieval_masked__finish_reason"]), shard)
    with pytest.raises(RetmaskError, match=r"lacks columns \['retrieval_masked__finish_reason'\]"):
        load_pairs(out)


def test_zero_pairs_left_reports_what_each_filter_removed(make_shards):
    out = make_shards([pair_row("a", "same", "same"), pair_row("b", "x", ""),
                       pair_row("c", "y", "z", normal_reason="length")])
    with pytest.raises(RetmaskError, match="removed: empty 1, identical 1, truncated 1, too_long 0") as err:
        load_pairs(out)
    assert "\n" not in str(err.value)


def test_manifest_without_shards_has_no_pairs(tmp_path):
    from pipeline.shard_writer import open_run

    open_run(tmp_path / "empty", RUN_CONFIG, VARIANTS)
    with pytest.raises(RetmaskError, match="after filtering 0 rows"):
        load_pairs(tmp_path / "empty")


def test_null_token_counts_count_as_zero(make_shards):
    rows = [pair_row("a", "x", "y")]
    rows[0]["normal__num_tokens"] = None
    pairs = load_pairs(make_shards(rows), eval_fraction=0.0, max_response_tokens=10, max_length=24)
    assert pairs.stats["pairs"] == 1
    assert pairs.stats["over_max_length"] == 1  # 20 prompt tokens + 5 from the masked side


def test_pairs_digest_follows_the_committed_shards_not_the_path_or_the_sessions(make_shards, tmp_path):
    from pipeline.shard_writer import open_run

    out = make_shards(mixed_rows())
    first = load_pairs(out, eval_fraction=0.0).stats
    assert first["pairs_digest"].startswith("sha256:") and first["shards"] == 1
    moved = shutil.copytree(out, tmp_path / "moved")
    assert load_pairs(moved, eval_fraction=0.0).stats["pairs_digest"] == first["pairs_digest"]
    writer = open_run(out, RUN_CONFIG, VARIANTS)  # a resumed generation: a new session, nothing committed yet
    assert load_pairs(out, eval_fraction=0.0).stats["pairs_digest"] == first["pairs_digest"]
    writer.write_shard([pair_row("extra", "one more", "generic")])
    grown = load_pairs(out, eval_fraction=0.0).stats
    assert grown["pairs_digest"] != first["pairs_digest"] and grown["shards"] == 2


def test_copies_of_a_prompt_fall_on_the_same_side_of_the_held_out_split():
    # prompt_options.repeats names copies <id>~1, <id>~2: one prompt must not be trained on and held out
    for pid in ("demo-0001", "p7", "a~b"):
        assert eval_bucket(f"{pid}~1") == eval_bucket(f"{pid}~12") == eval_bucket(pid)
    assert eval_bucket("demo-0001") != eval_bucket("demo-0002")
    assert eval_bucket("x~y") != eval_bucket("x")  # only a numeric copy suffix groups
