"""`retmask inspect`: statistics, samples and plots of a run, and bad shards named instead of crashing."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import RUN_CONFIG, VARIANTS

from pipeline.inspect import format_report, inspect_run
from pipeline.shard_schema import make_row
from pipeline.shard_writer import open_run
from pipeline.shards import read_manifest
from retrieval_heads.errors import RetmaskError


def row(pid, normal, masked, random, masked_reason="stop"):
    return make_row(
        pid,
        f"prompt {pid}",
        0,
        5,
        {
            "normal": (normal, len(normal.split()), "stop"),
            "retrieval_masked": (masked, len(masked.split()), masked_reason),
            "random_masked": (random, len(random.split()), "stop"),
        },
    )


@pytest.fixture
def run(tmp_path):
    """Two shards: 5 rows with one identical, one empty and one truncated retrieval-masked response."""
    out = tmp_path / "out"
    writer = open_run(out, RUN_CONFIG, VARIANTS)
    writer.write_shard(
        [
            row(
                "p0",
                "Paris is the capital of France.",
                "Paris is the capital of France.",
                "Paris is the capital of France.",
            ),
            row("p1", "The answer is 4.", "", "The answer is four."),
            row(
                "p2",
                "Water boils at 100 C.",
                "Water water water water water water",
                "Water boils at 100 C!",
                masked_reason="length",
            ),
        ]
    )
    writer.write_shard(
        [
            row("p3", "A long careful answer " * 30, "A shorter answer.", "A long careful answer " * 29),
            row("p4", "Yes.", "No, I do not remember.", "Yes."),
        ]
    )
    return out


def test_report_counts_rows_variants_and_unusable_pairs(run, tmp_path):
    report = inspect_run(run)
    assert report["rows"] == 5 and report["shards"] == {"listed": 2, "valid": 2} and not report["problems"]
    assert report["variants"] == VARIANTS
    assert report["pairs"]["retrieval_masked"] == {"identical": 1, "empty": 1, "truncated": 1, "usable": 2}
    assert report["pairs"]["random_masked"] == {"identical": 2, "empty": 0, "truncated": 0, "usable": 3}
    assert "normal" not in report["pairs"]
    masked = report["variant_stats"]["retrieval_masked"]
    assert masked["outputs"] == 5 and masked["empty"] == 1
    assert masked["finish_reasons"] == {"stop": 4, "length": 1}


def test_token_stats_give_mean_median_p90_and_max_per_variant(run):
    tokens = inspect_run(run)["variant_stats"]["normal"]["tokens"]
    # normal lengths: 6, 4, 5, 120, 1
    assert tokens == {"mean": 27.2, "p50": 5.0, "p90": pytest.approx(74.4), "max": 120}
    assert inspect_run(run)["prompt_tokens"]["max"] == 5


def test_a_length_histogram_is_written_per_variant(run, tmp_path):
    report = inspect_run(run, plots_dir=tmp_path / "plots")
    assert sorted(report["plots"]) == sorted(VARIANTS)
    for path in report["plots"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_text_report_shows_sample_pairs_side_by_side_truncated(run):
    report = inspect_run(run, num_samples=3, sample_chars=40)
    assert [s["prompt_id"] for s in report["samples"]] == ["p0", "p1", "p2"]
    text = format_report(report)
    assert "normal" in text and "retrieval_masked" in text and " | " in text
    assert "identical" in text and "problems: none" in text
    long = inspect_run(run, num_samples=5, sample_chars=40)["samples"][3]["normal"]
    assert len(long) == 40 and long.endswith("…")


def test_a_corrupt_shard_is_named_and_the_rest_still_counted(run):
    bad = read_manifest(run)["shards"][1]["file"]
    (run / bad).write_bytes(b"PAR1 this is not parquet PAR1")
    report = inspect_run(run)
    assert report["rows"] == 3 and report["shards"]["valid"] == 1
    (problem,) = report["problems"]
    assert problem.startswith(bad) and "corrupt" in problem and "sha256 differs" in problem
    assert bad in format_report(report)


def test_a_missing_listed_shard_is_named(run):
    gone = read_manifest(run)["shards"][0]["file"]
    (run / gone).unlink()
    assert inspect_run(run)["problems"] == [f"{gone}: listed in the manifest but missing"]


def test_a_modified_shard_fails_its_checksum(run):
    entry = read_manifest(run)["shards"][0]
    table = pq.read_table(run / entry["file"])
    pq.write_table(table.slice(0, 2), run / entry["file"])
    (problem,) = inspect_run(run)["problems"]
    assert "sha256 differs" in problem and "2 rows, manifest says 3" in problem


def test_a_shard_with_a_foreign_schema_is_named(run):
    manifest = read_manifest(run)
    entry = manifest["shards"][0]
    pq.write_table(pa.table({"prompt_id": ["x", "y", "z"], "chosen": ["a", "b", "c"]}), run / entry["file"])
    entry["sha256"] = hashlib.sha256((run / entry["file"]).read_bytes()).hexdigest()  # a valid listing
    (run / "manifest.json").write_text(json.dumps(manifest))
    (problem,) = inspect_run(run)["problems"]
    assert problem.startswith(entry["file"]) and "foreign schema" in problem
    assert "'normal__text'" in problem and "unexpected columns ['chosen']" in problem


def test_unlisted_shards_and_temp_files_are_named(run):
    (run / "data" / "part-00007-cafebabe.parquet").write_bytes(b"x")
    (run / "data" / ".tmp-1234.parquet").write_bytes(b"x")
    problems = inspect_run(run)["problems"]
    assert problems == [
        "data/.tmp-1234.parquet: temporary file of an interrupted writer; readers ignore it, reopening the run "
        "removes it",
        "data/part-00007-cafebabe.parquet: not listed in the manifest; readers ignore it, reopening the run removes it",
    ]


def test_an_empty_run_reports_zero_rows(tmp_path):
    open_run(tmp_path / "out", RUN_CONFIG, VARIANTS)
    report = inspect_run(tmp_path / "out", plots_dir=tmp_path / "plots")
    assert report["rows"] == 0 and report["variant_stats"]["normal"]["tokens"] is None and not report["problems"]
    assert "problems: none" in format_report(report)


def test_a_directory_without_manifest_is_a_user_error(tmp_path):
    with pytest.raises(RetmaskError, match="has no manifest.json"):
        inspect_run(tmp_path)
