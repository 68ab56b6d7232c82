"""Graded negatives: any number of named variants, each with its head-selection rule, from config to shards to
trainer and inspect; and the generation pipeline's default, one mixed batch, against engine-wide switching.
"""

import re
from types import SimpleNamespace

import pytest
from support import RETRIEVAL, prompt_rows, retmask, write_config, write_prompts, write_scores

from pipeline.generate import GenerateConfig
from pipeline.inspect import inspect_run
from pipeline.run_config import check_config, variant_masks
from pipeline.shards import read_manifest, read_pairs_table
from retrieval_heads.config import from_mapping
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import ModelShape
from trainer.data import load_pairs

SHAPE = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192)
GRADED = {
    "variants": ["normal", "retrieval_masked", "top2", "random_masked", "anywhere", "plain_again"],
    "variant_rules": {
        "top2": {"rule": "top_k", "k": 2},
        "anywhere": {"rule": "random_all", "like": "retrieval_masked", "seed": 7},
        "plain_again": {"rule": "none"},
    },
}


def _config(tmp_path, **fields) -> GenerateConfig:
    return from_mapping(GenerateConfig, {"scores": str(write_scores(tmp_path / "scores.json")), **fields}, "test")


def test_built_in_variants_keep_their_manifest_record(tmp_path):
    # Outputs written before graded variants existed must still resume: same heads, same selection record.
    heads, record = variant_masks(_config(tmp_path, variants=["normal", "retrieval_masked", "random_masked"]), SHAPE)
    assert heads["normal"] == [] and heads["retrieval_masked"] == sorted(RETRIEVAL)
    assert len(heads["random_masked"]) == 5 and not set(heads["random_masked"]) & set(RETRIEVAL)
    assert record["retrieval_masked"]["selection"] == {"strategy": "threshold", "threshold": 0.1}
    assert record["random_masked"]["selection"] == {"strategy": "random_nonretrieval", "k": 5, "seed": 0,
                                                    "exclude": "retrieval_masked"}


def test_each_named_variant_gets_the_heads_its_rule_selects(tmp_path):
    heads, record = variant_masks(_config(tmp_path, **GRADED), SHAPE)
    assert list(heads) == GRADED["variants"]
    assert len(heads["top2"]) == 2 and set(heads["top2"]) <= set(RETRIEVAL)
    assert len(heads["anywhere"]) == len(RETRIEVAL) and heads["anywhere"] != heads["random_masked"]
    assert heads["plain_again"] == [] and "selection" not in record["plain_again"]
    assert record["top2"]["selection"] == {"strategy": "top_k", "k": 2}
    assert record["anywhere"]["selection"] == {"strategy": "random_all", "k": 5, "seed": 7}
    assert variant_masks(_config(tmp_path, **GRADED), SHAPE) == (heads, record)  # seeded: the same every time


@pytest.mark.parametrize("fields, message", [
    ({"variants": ["normal", "top9"]}, "neither built in"),
    ({"variants": ["normal"], "variant_rules": {"top9": {"rule": "top_k", "k": 9}}}, "does not list them"),
    ({"variants": ["normal", "retrieval_masked"], "variant_rules": {"retrieval_masked": {"rule": "none"}}},
     "built-in variants"),
    ({"variants": ["retrieval_masked", "normal"]}, "start with 'normal'"),
    ({"variants": ["normal", "x"], "variant_rules": {"x": {"rule": "best"}}}, "variant_rules.x must be a mapping"),
    ({"variants": ["normal", "x"], "variant_rules": {"x": {"rule": "top_k"}}}, "needs k"),
    ({"variants": ["normal", "x"], "variant_rules": {"x": {"rule": "top_k", "k": 2, "seed": 1}}}, "not ['seed']"),
    ({"variants": ["normal", "x"], "variant_rules": {"x": {"rule": "random_all"}}}, "exactly one of k"),
    ({"variants": ["normal", "x"], "variant_rules": {"x": {"rule": "random_all", "like": "retrieval_masked"}}},
     "must name a listed variant"),
    ({"variants": ["normal", "retrieval_masked", "random_masked", "x"],
      "variant_rules": {"x": {"rule": "random_all", "like": "random_masked"}}}, "not by like"),
    ({"variants": ["normal", *(f"v{i}" for i in range(16))],
      "variant_rules": {f"v{i}": {"rule": "top_k", "k": i + 1} for i in range(16)}}, "set batching: switched"),
    ({"batching": "interleaved"}, "batching must be one of"),
])
def test_a_wrong_variant_definition_is_one_line_naming_it(tmp_path, fields, message):
    with pytest.raises(RetmaskError, match=re.escape(message)) as err:
        check_config(_config(tmp_path, **fields))
    assert "\n" not in str(err.value)


def test_sixteen_masked_variants_run_when_switched(tmp_path):
    rules = {f"v{i}": {"rule": "top_k", "k": i + 1} for i in range(16)}
    check_config(_config(tmp_path, variants=["normal", *rules], variant_rules=rules, batching="switched"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, embedded_model_path):
    """The same graded, greedy run twice: mixed batches (the default) and engine-wide switching."""
    tmp = tmp_path_factory.mktemp("graded")
    prompts = write_prompts(tmp / "prompts.jsonl", prompt_rows(6))
    scores = write_scores(tmp / "scores.json")
    out = {}
    for batching in ("mixed", "switched"):
        fields = {**GRADED, "prompts": str(prompts), "scores": str(scores), "out": str(tmp / batching),
                  "sampling": {"max_tokens": 16, "temperature": 0.0}}
        if batching == "switched":
            fields["batching"] = "switched"
        result = retmask("generate", "--config", str(write_config(tmp / f"{batching}.yaml", **fields)))
        assert result.returncode == 0, result.stderr[-3000:]
        out[batching] = tmp / batching
    return SimpleNamespace(**out)


@pytest.mark.slow
def test_mixed_batches_give_the_switched_runs_tokens_for_every_variant(runs):
    columns = ["prompt_id"] + [f"{v}__{f}" for v in GRADED["variants"] for f in ("text", "num_tokens")]
    mixed = sorted(read_pairs_table(runs.mixed, columns=columns).to_pylist(), key=lambda r: r["prompt_id"])
    switched = sorted(read_pairs_table(runs.switched, columns=columns).to_pylist(), key=lambda r: r["prompt_id"])
    assert len(mixed) == 6 and mixed == switched
    texts = {v: [r[f"{v}__text"] for r in mixed] for v in GRADED["variants"]}
    assert texts["plain_again"] == texts["normal"]  # rule none is the plain model, also inside a mixed batch
    assert texts["retrieval_masked"] != texts["normal"] and texts["top2"] != texts["normal"]
    manifest = read_manifest(runs.mixed)
    assert manifest["run_config"]["generation"]["batching"] == "mixed"
    assert manifest["run_config"]["masks"] == read_manifest(runs.switched)["run_config"]["masks"]


@pytest.mark.slow
def test_graded_variants_reach_inspect_and_the_trainer_by_name(runs):
    report = inspect_run(runs.mixed)
    assert report["problems"] == [] and list(report["pairs"]) == GRADED["variants"][1:]
    assert report["pairs"]["plain_again"]["identical"] == 6
    pairs = load_pairs(runs.mixed, chosen="normal", rejected="top2", eval_fraction=0.0, drop_truncated=False)
    assert pairs.stats["rejected"] == "top2" and pairs.stats["pairs"] + pairs.stats["removed"].get("identical", 0) == 6
    assert pairs.train[0]["rejected"][0]["content"] in [r["top2__text"] for r in read_pairs_table(runs.mixed)
                                                        .to_pylist()]
