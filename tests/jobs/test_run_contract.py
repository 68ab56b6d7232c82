"""The run contract, through real processes: exit 0 done, 1 user error or problems found, 2 usage, 130 Ctrl-C,
143 SIGTERM; a user error is one line; nothing committed is ever damaged; an interrupted run resumes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    REPO,
    assert_user_error,
    child_env,
    prompt_rows,
    retmask,
    wait_for_commits,
    write_config,
    write_prompts,
    write_scores,
    write_shards,
    written_ids,
)


@pytest.mark.parametrize("args", [[], ["bogus"], ["detect", "--nope"], ["inspect"], ["export-masked", "--k", "3"],
                                  ["train", "--max-steps", "x", "--pairs", "p"], ["serve", "--port", "x"]])
def test_usage_errors_exit_2_with_the_usage_message_and_no_traceback(args):
    result = retmask(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Usage:" in result.stdout + result.stderr


@pytest.mark.parametrize("module", ["jobs.generate", "jobs.eval", "jobs.detect", "jobs.train", "jobs.serve"])
def test_module_entry_points_exit_2_on_usage_errors(module):
    # `python -m jobs.<stage>` is `retmask <stage>`: the same options, the same contract
    result = retmask("--nope", module=module)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Usage: retmask" in result.stderr


def test_module_entry_point_user_error_is_one_line_exit_1(tmp_path):
    assert_user_error(retmask("--config", str(tmp_path / "missing.yaml"), module="jobs.generate"), "missing.yaml",
                      "does not exist")


def _shards(tmp_path, model_dir=None):
    from pipeline.provenance import hash_model_dir
    from pipeline.shard_schema import make_row

    model = {"id": "smollm2-135m-instruct", "hash": hash_model_dir(model_dir) if model_dir else "h"}
    rows = [make_row(f"p{i}", "q", 1, 2, {"normal": ("a", 1, "stop"), "retrieval_masked": ("b", 1, "stop")})
            for i in range(3)]
    return write_shards(tmp_path / "out", rows, ["normal", "retrieval_masked"], run_config={"model": model, "seed": 0})


def test_inspect_exits_1_when_it_reports_a_corrupt_listed_shard(tmp_path):
    out = _shards(tmp_path)
    assert retmask("inspect", str(out)).returncode == 0
    shard = next((out / "data").glob("part-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-20])  # truncated
    result = retmask("inspect", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert shard.name in result.stdout and "sha256 differs" in result.stdout


def test_inspect_and_train_refuse_a_manifest_of_the_wrong_shape_in_one_line(tmp_path):
    out = _shards(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(retmask("inspect", str(out)), "manifest.json", "'shards'")
    assert_user_error(retmask("train", "--pairs", str(out), "--preset", "demo", "--out", str(tmp_path / "t")),
                      "'shards'")


def test_train_refuses_an_altered_shard_naming_it(tmp_path, embedded_model_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = _shards(tmp_path, embedded_model_path)
    shard = next((out / "data").glob("part-*.parquet"))
    table = pq.read_table(shard)
    pq.write_table(table.set_column(4, "normal__text", pa.array(["x"] * 3)), shard)  # valid Parquet, other content
    result = retmask("train", "--pairs", str(out), "--preset", "demo", "--out", str(tmp_path / "t"))
    assert_user_error(result, shard.name, "does not match manifest.json", "sha256")
    assert not (tmp_path / "t" / "final").exists()


def test_bad_score_values_and_k_are_one_line_errors(tmp_path, embedded_model_path):
    scores = write_scores(tmp_path / "s.json")
    assert_user_error(retmask("export-masked", "--scores", str(scores), "--strategy", "top_k", "--k", "0",
                              "--out", str(tmp_path / "m")), "k")
    data = json.loads(scores.read_text())
    data["3-4"] = [float("nan")]
    (tmp_path / "nan.json").write_text(json.dumps(data))  # json writes the NaN literal Python reads back
    assert_user_error(retmask("export-masked", "--scores", str(tmp_path / "nan.json"), "--out", str(tmp_path / "m")),
                      "3-4")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------
# generate: bad sources and models fail before any engine starts, and leave nothing behind


def test_a_prompt_source_without_one_usable_prompt_exits_1_and_leaves_no_output(tmp_path, embedded_model_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "a", "prompt": ""}, {"id": "b", "text": "no prompt field"}])
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", prompts=str(prompts), scores=str(write_scores(tmp_path / "s.json")),
                          out=str(out))
    assert_user_error(retmask("generate", "--config", str(config)), "p.jsonl", "no usable prompt")
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.parquet"))
    (tmp_path / "empty.jsonl").write_text("")
    assert_user_error(retmask("generate", "--config", str(config), "--prompts", str(tmp_path / "empty.jsonl")),
                      "no usable prompt")
    assert not (out / "manifest.json").exists()


def test_a_model_without_a_chat_template_is_a_user_error(tmp_path, embedded_model_path):
    model = tmp_path / "plain-lm"
    model.mkdir()
    for f in Path(embedded_model_path).iterdir():
        if f.name == "tokenizer_config.json":
            config = json.loads(f.read_text())
            config.pop("chat_template", None)
            (model / f.name).write_text(json.dumps(config))
        elif f.name != "chat_template.jinja":
            (model / f.name).symlink_to(f)
    config = write_config(tmp_path / "c.yaml", model=str(model), scores=str(write_scores(tmp_path / "s.json")),
                          prompts=str(write_prompts(tmp_path / "p.jsonl", prompt_rows(2))), out=str(tmp_path / "out"))
    assert_user_error(retmask("generate", "--config", str(config)), "no chat template")


# ---------------------------------------------------------------------------------------------------
# interrupted runs: 130 / 143, nothing damaged, the rerun finishes the job


@pytest.mark.slow
def test_ctrl_c_exits_130_sigterm_143_and_the_rerun_gives_every_prompt_once(tmp_path, embedded_model_path):
    import psutil

    from pipeline.shards import read_pairs_table

    rows = prompt_rows(24)  # 6 batches of 4
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", prompts=str(write_prompts(tmp_path / "p.jsonl", rows)),
                          scores=str(write_scores(tmp_path / "s.json")), out=str(out))
    committed = []
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        log = tmp_path / f"{sig.name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", "--config", str(config)], cwd=REPO,
                                    env=child_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_for_commits(out, proc, log, n=len(committed) + 1)
                children = psutil.Process(proc.pid).children(recursive=True)
                if sig == signal.SIGINT:
                    os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does: the whole foreground group
                else:
                    os.kill(proc.pid, sig)  # what a scheduler does: the driver alone
                rc = proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        text = log.read_text()
        assert rc == code, text[-3000:]
        assert "rerun the same command to resume" in text and "Traceback" not in text
        _, alive = psutil.wait_procs(children, timeout=60)
        for p in alive:
            p.kill()
        assert not alive, f"{sig.name} left processes behind: {[p.pid for p in alive]}"
        committed.append(read_pairs_table(out).num_rows)  # readable, verified: nothing damaged
    assert 0 < committed[0] <= committed[1] < len(rows)
    done = retmask("generate", "--config", str(config), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert written_ids(out) == [r["id"] for r in rows]
    assert retmask("inspect", str(out)).returncode == 0


@pytest.mark.parametrize("yaml_text, needle", [
    ("sampling: {max_tokens: sixteen}\n", "sampling.max_tokens must be an integer"),
    ("batch_size: [4]\n", "batch_size must be an integer"),
    ("nope: 1\n", "unknown GenerateConfig field nope"),
])
def test_config_values_of_the_wrong_type_are_one_line_errors_naming_the_field(tmp_path, yaml_text, needle):
    (tmp_path / "c.yaml").write_text(yaml_text)
    assert_user_error(retmask("generate", "--config", str(tmp_path / "c.yaml")), "c.yaml", needle)


def test_numbers_written_as_strings_in_yaml_are_read_as_numbers(tmp_path):
    from pipeline.generate import GenerateConfig
    from retrieval_heads.config import load_config

    (tmp_path / "c.yaml").write_text('sampling: {max_tokens: "16", temperature: 1e-1}\nbatch_size: "4"\n')
    config = load_config(GenerateConfig, tmp_path / "c.yaml")  # PyYAML reads 1e-1 as the string "1e-1"
    assert (config.sampling.max_tokens, config.sampling.temperature, config.batch_size) == (16, 0.1, 4)
