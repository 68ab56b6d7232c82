"""The Parquet contract: schema, atomic commits, manifest, resume, object storage, and what readers load."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import shard_writer, shards
from pipeline.provenance import hash_model_dir, package_versions
from pipeline.shard_schema import SCHEMA_VERSION, make_row, schema_for
from pipeline.shard_writer import open_run
from pipeline.shards import committed_prompt_ids, read_manifest, read_pairs_table
from retrieval_heads.errors import RetmaskError

VARIANTS = ["normal", "retrieval_masked"]
CONFIG = {
    "model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "path": "/models/smol", "hash": "sha256:abc"},
    "masks": {"retrieval_masked": {"heads": [[3, 1], [5, 0]], "scores_hash": "sha256:def"}},
    "sampling": {"temperature": 0.6, "top_p": 1.0, "max_tokens": 64},
    "seed": 1234,
    "packages": {"vllm": "0.32.0"},
}


def rows(ids, text="answer"):
    return [
        make_row(pid, f"question {pid}", 1234, 7,
                 {"normal": (f"{text} {pid}", 3, "stop"), "retrieval_masked": ("masked", 1, "length")})
        for pid in ids
    ]


def data_files(out):
    return sorted(p.name for p in (out / "data").iterdir())


def listed_files(out):
    return sorted(s["file"].split("/")[-1] for s in read_manifest(out)["shards"])


def fail_manifest_writes(monkeypatch, message: str) -> None:
    """Make every commit record (and manifest) write raise, as if the writer died right before the commit."""
    real_put = shard_writer._put

    def put(fs, path, data):
        if path.endswith("manifest.json"):
            raise RuntimeError(message)
        real_put(fs, path, data)

    def commit(self, version, entry):
        raise RuntimeError(message)

    monkeypatch.setattr(shard_writer, "_put", put)
    monkeypatch.setattr(shard_writer.ShardWriter, "_commit_record", commit)


def test_schema_has_one_row_per_prompt_with_every_variant_and_its_version():
    schema = schema_for(VARIANTS)
    assert schema.names == [
        "prompt_id", "prompt", "seed", "num_prompt_tokens",
        "normal__text", "normal__num_tokens", "normal__finish_reason",
        "retrieval_masked__text", "retrieval_masked__num_tokens", "retrieval_masked__finish_reason",
    ]
    assert schema.field("seed").type == pa.int64() and schema.field("normal__num_tokens").type == pa.int32()
    assert schema.metadata[b"retmask.schema_version"] == str(SCHEMA_VERSION).encode()


@pytest.mark.parametrize("bad", [[], ["normal", "normal"], ["Normal"], ["a__b"], ["with space"]])
def test_variant_names_must_be_distinct_snake_case(bad):
    with pytest.raises(RetmaskError):
        schema_for(bad)


def test_committed_shards_are_listed_with_checksums_and_no_temp_file_remains(tmp_path):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    first = writer.write_shard(rows(["p0", "p1", "p2"]))
    writer.write_shard(rows(["p3"]))
    assert first["file"].startswith("data/part-00000-") and first["rows"] == 3
    assert data_files(out) == listed_files(out)  # nothing else: no .tmp-* left behind
    assert first["sha256"] == hashlib.sha256((out / first["file"]).read_bytes()).hexdigest()
    assert first["prompt_ids_hash"] == hashlib.sha256(b"p0\np1\np2").hexdigest()
    manifest = read_manifest(out)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["variants"] == VARIANTS
    assert manifest["run_config"]["sampling"] == CONFIG["sampling"] and manifest["num_rows"] == 4
    assert pq.read_schema(out / first["file"]).metadata[b"retmask.schema_version"] == b"1"
    writer.close()  # the card follows the checkpoints: every CHECKPOINT_EVERY commits and on close
    card = (out / "README.md").read_text()
    assert "rows: 4 in 2 shards" in card and "SmolLM2-135M-Instruct" in card and "load_dataset" in card
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_crash_after_the_temp_file_is_written_leaves_committed_shards_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p0", "p1"]))
    real_write = shard_writer._write_bytes

    def write_then_crash(fs, path, data):
        real_write(fs, path, data)
        if "/.tmp-" in path and path.endswith(".parquet"):
            raise RuntimeError("simulated crash inside the writer")

    monkeypatch.setattr(shard_writer, "_write_bytes", write_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        writer.write_shard(rows(["p2", "p3"]))
    assert data_files(out) == listed_files(out) and len(listed_files(out)) == 1
    assert read_pairs_table(out).column("prompt_id").to_pylist() == ["p0", "p1"]
    monkeypatch.setattr(shard_writer, "_write_bytes", real_write)
    writer.write_shard(rows(["p2", "p3"]))  # the writer stays usable
    assert committed_prompt_ids(out) == {"p0", "p1", "p2", "p3"}


def test_failed_manifest_update_removes_the_renamed_shard(tmp_path, monkeypatch):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p0"]))
    fail_manifest_writes(monkeypatch, "killed before the manifest was replaced")
    with pytest.raises(RuntimeError):
        writer.write_shard(rows(["p1"]))
    assert data_files(out) == listed_files(out) and committed_prompt_ids(out) == {"p0"}


KILLED_WRITER = textwrap.dedent("""
    import json, os, sys
    from pipeline import shard_writer
    from pipeline.shard_schema import make_row
    config, variants = json.loads(sys.argv[2]), ["normal", "retrieval_masked"]
    def rows(ids):
        return [make_row(i, "q", 0, 1, {v: ("a", 1, "stop") for v in variants}) for i in ids]
    writer = shard_writer.open_run(sys.argv[1], config, variants)
    writer.write_shard(rows(["p0", "p1"]))
    real_write = shard_writer._write_bytes
    def write_then_die(fs, path, data):
        real_write(fs, path, data)
        if "/.tmp-" in path and path.endswith(".parquet"):
            os._exit(9)  # like SIGKILL: no cleanup, no finally blocks
    shard_writer._write_bytes = write_then_die
    writer.write_shard(rows(["p2", "p3"]))
""")


def test_killed_writer_leaves_a_temp_file_that_readers_ignore_and_reopening_removes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out), json.dumps(CONFIG)], cwd=tmp_path)
    assert proc.returncode == 9
    leftovers = [n for n in data_files(out) if n.startswith(".tmp-")]
    assert len(leftovers) == 1
    assert committed_prompt_ids(out) == {"p0", "p1"}  # readers ignore the temp file
    (out / "data" / "part-00001-deadbeef.parquet").write_bytes(b"unlisted shard of a crashed commit")
    writer = open_run(out, CONFIG, VARIANTS)
    assert data_files(out) == listed_files(out)
    assert writer.committed_ids == {"p0", "p1"}


def test_resume_skips_prompt_ids_already_committed(tmp_path):
    out = tmp_path / "out"
    open_run(out, CONFIG, VARIANTS).write_shard(rows(["p0", "p1", "p2"]))
    resumed = open_run(out, {**CONFIG, "packages": {"vllm": "0.33.0"}}, VARIANTS)  # package versions may differ
    assert resumed.committed_ids == committed_prompt_ids(out) == {"p0", "p1", "p2"}
    entry = resumed.write_shard(rows(["p2", "p3", "p4"]))
    assert entry["rows"] == 2
    assert resumed.write_shard(rows(["p0"])) is None
    table = read_pairs_table(out)
    assert sorted(table.column("prompt_id").to_pylist()) == ["p0", "p1", "p2", "p3", "p4"]
    assert len(read_manifest(out)["sessions"]) == 2


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"sampling": {**CONFIG["sampling"], "temperature": 0.7}}, "sampling.temperature"),
        ({"model": {**CONFIG["model"], "hash": "sha256:other"}}, "model.hash"),
        ({"masks": {"retrieval_masked": {"heads": [[3, 1]], "scores_hash": "sha256:def"}}},
         "masks.retrieval_masked.heads"),
        ({"seed": 1}, "seed"),
    ],
)
def test_reopening_with_a_different_run_config_is_refused_naming_the_key(tmp_path, change, key):
    out = tmp_path / "out"
    open_run(out, CONFIG, VARIANTS).write_shard(rows(["p0"]))
    with pytest.raises(RetmaskError, match=rf"{key} is .* there but .* now; use a new output directory"):
        open_run(out, {**CONFIG, **change}, VARIANTS)
    assert committed_prompt_ids(out) == {"p0"}


def test_moving_the_model_directory_does_not_block_resume(tmp_path):
    out = tmp_path / "out"
    open_run(out, CONFIG, VARIANTS).write_shard(rows(["p0"]))
    moved = open_run(out, {**CONFIG, "model": {**CONFIG["model"], "path": "/elsewhere/smol"}}, VARIANTS)
    assert moved.committed_ids == {"p0"}  # resumed: neither refused nor started over
    moved.write_shard(rows(["p1"]))
    assert committed_prompt_ids(out) == {"p0", "p1"}


def test_reopening_with_other_variants_is_refused(tmp_path):
    open_run(tmp_path / "out", CONFIG, VARIANTS)
    with pytest.raises(RetmaskError, match="holds variants"):
        open_run(tmp_path / "out", CONFIG, ["normal", "random_masked"])


def test_a_non_empty_directory_without_manifest_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RetmaskError, match="already holds files but no manifest.json"):
        open_run(tmp_path, CONFIG, VARIANTS)


def test_rows_must_match_the_schema_exactly(tmp_path):
    writer = open_run(tmp_path / "out", CONFIG, VARIANTS)
    bad = rows(["p0"])
    bad[0]["random_masked__text"] = bad[0].pop("retrieval_masked__text")
    with pytest.raises(ValueError, match="missing .*retrieval_masked__text.*unexpected .*random_masked__text"):
        writer.write_shard(bad)
    with pytest.raises(ValueError, match="duplicate prompt_id"):
        writer.write_shard(rows(["p0", "p0"]))


def test_an_arrow_table_with_the_schema_columns_can_be_written_directly(tmp_path):
    writer = open_run(tmp_path / "out", CONFIG, VARIANTS)
    table = pa.Table.from_pylist(rows(["p0", "p1"]))  # inferred int64 counts are cast to the schema
    assert writer.write_shard(table.select(list(reversed(table.column_names))))["rows"] == 2
    assert read_pairs_table(tmp_path / "out").schema.equals(schema_for(VARIANTS), check_metadata=False)


def test_output_loads_unchanged_with_datasets_pandas_and_duckdb(tmp_path):
    import datasets
    import duckdb
    import pandas as pd

    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p0", "p1"]))
    writer.write_shard(rows(["p2"]))
    (out / "data" / ".tmp-inflight.parquet").write_bytes(b"half written")  # a commit in progress
    names = schema_for(VARIANTS).names

    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "part-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.column_names == names and sorted(ds["prompt_id"]) == ["p0", "p1", "p2"]
    assert ds[0]["normal__text"] == "answer p0"
    card = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf2"))  # README front matter
    assert card.num_rows == 3

    df = pd.read_parquet(out / "data")
    assert list(df.columns) == names and len(df) == 3 and df["seed"].dtype == "int64"

    got = duckdb.sql(f"SELECT count(*), sum(normal__num_tokens) FROM '{out}/data/part-*.parquet'").fetchall()[0]
    assert got == (3, 9)


def test_readers_read_only_manifest_listed_shards(tmp_path):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    entry = writer.write_shard(rows(["p0"]))
    (out / "data" / "part-00009-00000000.parquet").write_bytes((out / entry["file"]).read_bytes())
    assert read_pairs_table(out).num_rows == 1
    assert read_pairs_table(out, columns=["prompt_id"]).column_names == ["prompt_id"]


def test_unwritable_output_directory_is_a_user_error_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(RetmaskError, match=f"cannot write to output directory {blocker}/out"):
        open_run(blocker / "out", CONFIG, VARIANTS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_output_directory_is_a_user_error_naming_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(RetmaskError, match=f"cannot write to output directory {out}"):
            open_run(out, CONFIG, VARIANTS)
    finally:
        out.chmod(0o700)


def test_disk_error_during_a_commit_is_a_user_error_and_keeps_committed_shards(tmp_path, monkeypatch):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p0"]))

    def disk_full(fs, path, data):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(shard_writer, "_write_bytes", disk_full)
    match = rf"cannot write {out}/data/part-00001-.*No space left.*committed shards are intact"
    with pytest.raises(RetmaskError, match=match):
        writer.write_shard(rows(["p1"]))
    assert data_files(out) == listed_files(out) and committed_prompt_ids(out) == {"p0"}


def test_model_hash_follows_weight_contents_and_caches_them_by_path_mtime_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("RETMASK_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    weights = model / "model.safetensors"
    weights.write_bytes(b"\0" * 100)
    first = hash_model_dir(model)
    assert first.startswith("sha256:") and hash_model_dir(model) == first
    weights.write_bytes(b"\1" * 100)  # a fine-tune: same tensor names and sizes, other values
    second = hash_model_dir(model)
    assert second != first
    cache = json.loads((tmp_path / "home" / "file_hashes.json").read_text())
    assert any(key.startswith(str(weights.resolve())) for key in cache)
    stat = weights.stat()
    weights.write_bytes(b"\2" * 100)  # same mtime and size: the cached digest is trusted, the file not re-read
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hash_model_dir(model) == second
    with pytest.raises(RetmaskError, match="does not exist"):
        hash_model_dir(tmp_path / "missing")


def test_package_versions_name_the_libraries_that_shape_outputs():
    versions = package_versions()
    assert versions["pyarrow"] == pa.__version__ and "vllm" in versions and "python" in versions


# ---------------------------------------------------------------------------------------------------
# object storage, for real, against a local S3 server (the s3 fixtures: tests/pipeline/conftest.py)


def s3_files(fs, prefix):
    infos = fs.get_file_info(pafs.FileSelector(f"{prefix}/data"))
    return sorted(i.path.split("/")[-1] for i in infos if i.type == pafs.FileType.File)


def test_object_store_commit_resume_and_read(s3):
    fs, bucket = s3
    out = f"{bucket}/runs/demo"
    writer = open_run(out, CONFIG, VARIANTS, filesystem=fs)
    writer.write_shard(rows(["p0", "p1"]))
    manifest = read_manifest(out, fs)
    assert s3_files(fs, out) == [s["file"].split("/")[-1] for s in manifest["shards"]]
    with fs.open_input_stream(f"{out}/{manifest['shards'][0]['file']}") as f:
        assert hashlib.sha256(f.read()).hexdigest() == manifest["shards"][0]["sha256"]

    resumed = open_run(out, CONFIG, VARIANTS, filesystem=fs)
    assert resumed.committed_ids == {"p0", "p1"}
    resumed.write_shard(rows(["p1", "p2"]))
    assert sorted(read_pairs_table(out, fs).column("prompt_id").to_pylist()) == ["p0", "p1", "p2"]
    with pytest.raises(RetmaskError, match="sampling.top_p"):
        open_run(out, {**CONFIG, "sampling": {**CONFIG["sampling"], "top_p": 0.9}}, VARIANTS, filesystem=fs)


def test_object_store_shard_counts_only_once_the_manifest_lists_it(s3, monkeypatch):
    fs, bucket = s3
    out = f"{bucket}/run"
    writer = open_run(out, CONFIG, VARIANTS, filesystem=fs)
    writer.write_shard(rows(["p0"]))
    fail_manifest_writes(monkeypatch, "killed between the shard upload and the manifest")
    with pytest.raises(RuntimeError):
        writer.write_shard(rows(["p1"]))
    monkeypatch.undo()
    assert committed_prompt_ids(out, fs) == {"p0"}
    # an upload a killed process never got to list: ignored by readers, removed on reopen
    with fs.open_output_stream(f"{out}/data/part-00001-0badc0de.parquet") as f:
        f.write(b"orphan")
    assert read_pairs_table(out, fs).num_rows == 1
    open_run(out, CONFIG, VARIANTS, filesystem=fs)
    assert s3_files(fs, out) == [read_manifest(out, fs)["shards"][0]["file"].split("/")[-1]]


def test_s3_uri_resolves_through_pyarrow(s3, s3_endpoint, monkeypatch):
    fs, bucket = s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    uri = f"s3://{bucket}/viauri?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    open_run(uri, CONFIG, VARIANTS).write_shard(rows(["p0"]))
    assert committed_prompt_ids(f"{bucket}/viauri", fs) == {"p0"}


# ---------------------------------------------------------------------------------------------------
# integrity on read, a second writer, and kill -9 at the commit's two dangerous moments


def _alter_first_shard(out) -> str:
    rel = read_manifest(out)["shards"][0]["file"]
    table = pq.read_table(out / rel)
    texts = table.column("normal__text").to_pylist()
    table = table.set_column(table.schema.get_field_index("normal__text"), "normal__text",
                             pa.array(["tampered"] + texts[1:], pa.string()))
    pq.write_table(table, out / rel)  # same rows, valid Parquet: only the checksum can tell
    return rel


def test_an_altered_listed_shard_is_refused_by_readers_and_by_resume_naming_it(tmp_path):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p0", "p1"]))
    writer.close()
    rel = _alter_first_shard(out)
    with pytest.raises(RetmaskError, match=rf"shard .*{rel} does not match manifest.json: sha256 differs.*restore it"):
        read_pairs_table(out)
    with pytest.raises(RetmaskError, match=rf"{rel} does not match manifest.json"):
        open_run(out, CONFIG, VARIANTS)
    (out / rel).unlink()
    with pytest.raises(RetmaskError, match=rf"{rel} is listed in manifest.json but missing"):
        committed_prompt_ids(out)


def test_a_listed_shard_with_another_row_count_is_refused(tmp_path):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    entry = writer.write_shard(rows(["p0", "p1"]))
    manifest = read_manifest(out)
    manifest["shards"][0]["rows"] = 3
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RetmaskError, match=rf"{entry['file']} does not match manifest.json: 2 rows, manifest says 3"):
        read_pairs_table(out)


@pytest.mark.parametrize("manifest, field", [
    ([1, 2], "holds a list"),
    ({"format": "retmask-pairs", "schema_version": 1, "variants": ["normal"], "run_config": {}}, "'shards'"),
    ({"format": "retmask-pairs", "schema_version": 1, "variants": ["normal"], "run_config": {},
      "shards": [{"file": 3}]}, r"shards\[0\]"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line_naming_the_field(tmp_path, manifest, field):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RetmaskError, match=rf"manifest.json: .*{field}.*not a retmask manifest"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("key, value", [
    ("engine", {"dtype": "bfloat16", "max_model_len": 4096}),
    ("chat_template", {"sha256": "other", "kwargs": {}}),
    ("model", {**CONFIG["model"], "revision": "abc123"}),
])
def test_resume_identity_covers_dtype_context_chat_template_and_revision(tmp_path, key, value):
    out = tmp_path / "out"
    base = {**CONFIG, "engine": {"dtype": "float32", "max_model_len": 4096},
            "chat_template": {"sha256": "t", "kwargs": {}}}
    open_run(out, base, VARIANTS).close()
    with pytest.raises(RetmaskError, match=rf"made by a different run: {key}\."):
        open_run(out, {**base, key: value}, VARIANTS)


def _open_in_another_process(out: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        import pyarrow.fs as pafs
        from pipeline.shard_writer import open_run
        from retrieval_heads.errors import RetmaskError
        fs = None if {endpoint!r} is None else pafs.S3FileSystem(endpoint_override={endpoint!r}, scheme="http",
            access_key="testing", secret_key="testing", region="us-east-1")
        try:
            open_run({out!r}, {CONFIG!r}, {VARIANTS!r}, filesystem=fs).close()
        except RetmaskError as err:
            print(err, file=sys.stderr)
            sys.exit(1)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_second_writer_on_the_same_output_is_refused_while_the_first_lives(tmp_path):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p0"]))
    second = _open_in_another_process(str(out))
    assert second.returncode == 1 and f"is being written by pid {os.getpid()}" in second.stderr
    assert committed_prompt_ids(out) == {"p0"}
    writer.write_shard(rows(["p1"]))  # the first writer is untouched by the refusal
    writer.close()  # releases the lease: the next writer may open it at once
    assert _open_in_another_process(str(out)).returncode == 0


def test_a_second_writer_on_the_same_object_store_prefix_is_refused(s3, s3_endpoint):
    fs, bucket = s3
    out = f"{bucket}/two-writers"
    writer = open_run(out, CONFIG, VARIANTS, filesystem=fs)
    writer.write_shard(rows(["p0"]))
    second = _open_in_another_process(out, s3_endpoint)
    assert second.returncode == 1 and "only one writer may use an output directory" in second.stderr
    writer.close()
    assert _open_in_another_process(out, s3_endpoint).returncode == 0


@pytest.mark.parametrize("fault, committed", [
    ("shard_published:2", {"p0", "p1"}),  # shard in place, no commit record yet: not committed
    ("checkpoint:1", {"p0", "p1", "p2"}),  # record written, killed before folding it into manifest.json
    ("manifest_write:2", {"p0", "p1", "p2"}),  # killed halfway through the checkpoint's manifest.json
])
def test_kill_9_inside_a_commit_keeps_every_committed_shard_and_the_rerun_cleans_up(tmp_path, fault, committed):
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        from pipeline.shard_schema import make_row
        from pipeline.shard_writer import open_run
        rows = lambda ids: [make_row(i, "q", 1, 2, {{"normal": ("a", 1, "stop"), "retrieval_masked": ("b", 1, "stop")}})
                            for i in ids]
        writer = open_run({str(out)!r}, {CONFIG!r}, {VARIANTS!r})
        writer.write_shard(rows(["p0", "p1"]))
        writer.write_shard(rows(["p2"]))  # killed inside this commit (the 2nd: a checkpoint is due)
        raise SystemExit("not killed")
    """)
    env = {**os.environ, "RETMASK_FAULT_KILL_AT": fault, "RETMASK_CHECKPOINT_EVERY": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -9, proc.stderr  # SIGKILL, the writer had no chance to clean up
    assert committed_prompt_ids(out) == committed  # readers fold manifest.json and the commit records
    if fault.startswith("manifest_write"):
        assert list(out.glob(".tmp-*-manifest.json"))  # the torn checkpoint never replaced manifest.json
    writer = open_run(out, CONFIG, VARIANTS)  # the dead pid's lease is free; reopening cleans up
    assert data_files(out) == listed_files(out) and not list(out.glob(".tmp-*"))
    assert not list((out / "_log").iterdir())  # everything folded into manifest.json at reopen
    assert writer.write_shard(rows(["p2"])) is None or "p2" not in committed
    assert committed_prompt_ids(out) == {"p0", "p1", "p2"}


def test_a_commit_costs_one_small_record_and_checkpoints_fold_them(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_writer, "CHECKPOINT_EVERY", 3)
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    for i in range(4):
        writer.write_shard(rows([f"p{i}"]))
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["log_version"] == 3 and len(on_disk["shards"]) == 3  # the checkpoint after commit 3
    assert sorted(p.name for p in (out / "_log").iterdir()) == [f"{4:020d}.json"]  # one record since then
    assert len(read_manifest(out)["shards"]) == 4 and committed_prompt_ids(out) == {"p0", "p1", "p2", "p3"}
    writer.close()
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 4 and not list((out / "_log").iterdir())


def test_a_second_writer_cannot_take_a_commit_number_even_past_the_lease(tmp_path):
    out = tmp_path / "out"
    first = open_run(out, CONFIG, VARIANTS)
    first.write_shard(rows(["p0"]))
    intruder = shard_writer.ShardWriter(str(out), *shards.output_fs(out), read_manifest(out), {"p0"})  # no lease check
    intruder.write_shard(rows(["p1"]))
    with pytest.raises(RetmaskError, match="commit 2 of .* was taken by another writer"):
        first.write_shard(rows(["p2"]))
    assert committed_prompt_ids(out) == {"p0", "p1"} and data_files(out) == listed_files(out)


def test_schema_v1_outputs_without_a_log_still_read_and_resume(tmp_path):
    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p0", "p1"]))
    writer.close()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["log_version"]  # what schema-v1 writers left: every shard in manifest.json, no _log/
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "_log").rmdir()
    assert committed_prompt_ids(out) == {"p0", "p1"}
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p2"]))
    assert committed_prompt_ids(out) == {"p0", "p1", "p2"}


def test_committed_files_give_datasets_exactly_the_committed_shards_mid_run(tmp_path):
    from datasets import load_dataset

    from pipeline.shards import committed_files

    out = tmp_path / "out"
    writer = open_run(out, CONFIG, VARIANTS)
    writer.write_shard(rows(["p0", "p1"]))
    writer.write_shard(rows(["p2"]))
    first = out / "data" / listed_files(out)[0]
    (out / "data" / "part-00002-deadbeef.parquet").write_bytes(first.read_bytes())  # an unlisted leftover
    files = committed_files(out)  # mid-run: manifest.json has no shard yet, the commit records have both
    assert [f.rsplit("/", 1)[-1] for f in files] == listed_files(out) and len(files) == 2
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(ds["prompt_id"]) == ["p0", "p1", "p2"]
