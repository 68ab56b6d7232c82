"""`retmask export-pairs`: the trainer's pairs, in the preference format other trainers read, with provenance.

Real consumers: `datasets.load_dataset` on the exported directory and files, and TRL's own DPO script
(`python -m trl.scripts.dpo`, what `trl dpo` launches) training one step from the files as written.
"""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from support import REPO, child_env, crafted_rows, pair_row, retmask, write_shards

from pipeline.export import export_pairs
from pipeline.shards import manifest_digest, read_manifest
from retrieval_heads.errors import RetmaskError
from trainer.data import eval_bucket, load_pairs

RETRIEVAL = "16-1,17-2,18-3,19-0,20-5"
# What `retmask generate` records (pipeline.run_config.run_config), with a recognisable value in every field.
RUN_CONFIG = {
    "model": {"id": "SmolLM2-135M-Instruct", "path": "/models/smol", "hash": "sha256:feedface"},
    "masks": {
        "normal": {"id": "none", "heads": "", "num_layers": 30, "num_heads": 9},
        "retrieval_masked": {"id": "5h-1a2b3c4d", "heads": RETRIEVAL, "num_layers": 30, "num_heads": 9,
                             "selection": {"strategy": "threshold", "threshold": 0.1},
                             "scores_digest": "0123456789abcdef"},
        "random_masked": {"id": "5h-99aa77bb", "heads": "2-0,5-3,7-7,9-1,11-4", "num_layers": 30, "num_heads": 9,
                          "selection": {"strategy": "random_nonretrieval", "k": 5, "seed": 0},
                          "scores_digest": "0123456789abcdef"},
    },
    "sampling": {"temperature": 0.6, "top_p": 1.0, "max_tokens": 64}, "seed": 7,
    "scores_file": "runs/detect/head_scores.json", "chat_template": {"sha256": "c0ffee", "kwargs": {}},
    "packages": {},
}


MIXED = [
    pair_row("good1", "answer one", "generic"),
    pair_row("good2", "answer two", "generic"),
    pair_row("empty1", "answer", ""),
    pair_row("empty2", "   ", "generic"),
    pair_row("same", "identical text", "identical text"),
    pair_row("trunc1", "long answer", "generic", normal_reason="length"),
    pair_row("trunc2", "answer", "long generic", masked_reason="length"),
    pair_row("long", "very long answer", "generic", masked_tokens=500),
]


def write_run(out: Path, rows: list[dict]) -> Path:
    """A generation output as `retmask generate` commits it (manifest + verified shards), without an engine."""
    return write_shards(out, rows, run_config=RUN_CONFIG, shard_size=5)


def load(dest: Path, *args, tmp_path: Path, **kwargs):
    from datasets import load_dataset

    return load_dataset(*args or (str(dest),), cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def test_export_keeps_exactly_the_trainers_pairs_and_counts_each_filter(tmp_path):
    out = write_run(tmp_path / "gen", MIXED)
    summary = export_pairs(out, tmp_path / "dest", max_tokens=100)
    assert summary["rows"] == 8 and summary["kept"] == summary["train"] == 2
    assert summary["removed"] == {"empty": 2, "identical": 1, "truncated": 2, "too_long": 1}
    table = pq.read_table(tmp_path / "dest" / "data" / "train-00000.parquet")
    assert table.column_names == ["prompt_id", "prompt", "chosen", "rejected"]
    assert table.to_pylist()[0] == {
        "prompt_id": "good1", "prompt": [{"role": "user", "content": "question good1"}],
        "chosen": [{"role": "assistant", "content": "answer one"}],
        "rejected": [{"role": "assistant", "content": "generic"}],
    }
    trained = load_pairs(out, eval_fraction=0.0, max_response_tokens=100)
    assert table.column("prompt_id").to_pylist() == trained.train["prompt_id"]
    assert trained.stats["removed"] == summary["removed"]


def test_truncated_pairs_are_kept_when_asked_and_any_two_variants_pair(tmp_path):
    out = write_run(tmp_path / "gen", MIXED)
    summary = export_pairs(out, tmp_path / "dest", chosen="random_masked", rejected="retrieval_masked",
                           drop_truncated=False)
    assert summary["removed"] == {"empty": 1, "identical": 0, "truncated": 0, "too_long": 0}
    first = pq.read_table(tmp_path / "dest" / "data" / "train-00000.parquet").to_pylist()[0]
    assert first["chosen"] == [{"role": "assistant", "content": "random good1"}]


def test_export_loads_with_datasets_by_directory_with_the_trainers_test_split(tmp_path):
    rows = crafted_rows(40)
    out = write_run(tmp_path / "gen", rows)
    export_pairs(out, tmp_path / "dest", test_fraction=0.25)
    pairs = load(tmp_path / "dest", tmp_path=tmp_path)
    assert set(pairs) == {"train", "test"}
    assert pairs["train"].column_names == ["prompt_id", "prompt", "chosen", "rejected"]
    held_out = {r["prompt_id"] for r in rows if eval_bucket(r["prompt_id"]) < 0.25}
    assert set(pairs["test"]["prompt_id"]) == held_out and len(pairs["train"]) + len(held_out) == 40
    assert set(load_pairs(out, eval_fraction=0.25).eval["prompt_id"]) == held_out
    sample = pairs["test"][0]
    assert sample["prompt"][0]["role"] == "user" and sample["chosen"][0]["role"] == "assistant"


def test_jsonl_and_plain_text_variant_load_with_datasets_json(tmp_path):
    out = write_run(tmp_path / "gen", MIXED)
    dest = tmp_path / "dest"
    summary = export_pairs(out, dest, fmt="jsonl", text=True)
    assert summary["files"] == ["data/train-00000.jsonl", "text/train-00000.jsonl"]
    chat = load(dest, "json", tmp_path=tmp_path, data_files=str(dest / "data" / "train-00000.jsonl"), split="train")
    assert chat["prompt_id"] == ["good1", "good2", "long"]
    assert chat[0]["rejected"] == [{"role": "assistant", "content": "generic"}]
    plain = load(dest, "json", tmp_path=tmp_path, data_files=str(dest / "text" / "train-00000.jsonl"), split="train")
    assert plain.column_names == ["prompt_id", "prompt", "chosen", "rejected"]
    assert plain[0] == {"prompt_id": "good1", "prompt": "question good1", "chosen": "answer one", "rejected": "generic"}
    assert load(dest, str(dest), "text", tmp_path=tmp_path)["train"]["chosen"] == plain["chosen"]
    # LLaMA-Factory: alpaca ranking format registered beside the files (`--dataset_dir DEST --dataset retmask_pairs`)
    entry = json.loads((dest / "dataset_info.json").read_text())["retmask_pairs"]
    assert entry == {"file_name": "text/train-00000.jsonl", "ranking": True,
                     "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}}


def test_dataset_card_carries_the_mechanistic_provenance(tmp_path):
    out = write_run(tmp_path / "gen", MIXED)
    export_pairs(out, tmp_path / "dest", max_tokens=100, test_fraction=0.5)
    card = (tmp_path / "dest" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    splits = {s["split"]: s["path"] for s in front["configs"][0]["data_files"]}
    assert front["configs"][0]["config_name"] == "default" and set(splits) <= {"train", "test"}
    assert splits["train"] == "data/train-*.parquet"
    for needle in ["SmolLM2-135M-Instruct", "sha256:feedface", "0123456789abcdef", RETRIEVAL, '"threshold": 0.1',
                   "runs/detect/head_scores.json", '"temperature": 0.6', "seed 7", "c0ffee",
                   "| 2 | 1 | 2 | 1 |", manifest_digest(read_manifest(out)), "--prompt_key prompt"]:
        assert needle in card, needle
    info = json.loads((tmp_path / "dest" / "export.json").read_text())
    assert info["provenance"]["heads"]["retrieval_masked"]["heads"] == RETRIEVAL
    assert info["provenance"]["heads"]["normal"]["num_heads"] == 0
    assert info["filters"]["removed"] == {"empty": 2, "identical": 1, "truncated": 2, "too_long": 1}
    assert info["source"]["manifest_digest"] == manifest_digest(read_manifest(out))


def test_non_empty_dest_is_refused_unless_overwrite_and_a_generation_output_never(tmp_path):
    out = write_run(tmp_path / "gen", MIXED)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(RetmaskError, match="not empty; pass --overwrite"):
        export_pairs(out, dest)
    assert (dest / "notes.txt").read_text() == "mine"
    export_pairs(out, dest, overwrite=True)
    assert not (dest / "notes.txt").exists() and (dest / "data" / "train-00000.parquet").exists()
    with pytest.raises(RetmaskError, match="overlaps the generation output"):
        export_pairs(out, out / "pairs", overwrite=True)
    other = write_run(tmp_path / "other-gen", MIXED)
    with pytest.raises(RetmaskError, match="holds a generation output"):
        export_pairs(out, other, overwrite=True)
    assert read_manifest(other)["num_rows"] == len(MIXED)


def test_unknown_variant_and_no_pair_left_are_one_line_errors_and_write_nothing(tmp_path):
    out = write_run(tmp_path / "gen", MIXED)
    known = r"it holds \['normal', 'retrieval_masked', 'random_masked'\]"
    with pytest.raises(RetmaskError, match=r"\['nope'\] not in .* " + known):
        export_pairs(out, tmp_path / "dest", rejected="nope")
    bad = write_run(tmp_path / "bad", [pair_row("a", "x", "x"), pair_row("b", "", "y"),
                                       pair_row("c", "y", "z", normal_reason="length")])
    with pytest.raises(RetmaskError, match="pairs left .* empty 1, identical 1, truncated 1, too_long 0"):
        export_pairs(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_disk_error_midway_is_one_line_and_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    import pipeline.export as export

    out = write_run(tmp_path / "gen", MIXED)
    dest = tmp_path / "dest"
    export_pairs(out, dest)
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    real_write = export._write

    def write_then_fail(path, *args):
        real_write(path, *args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write", write_then_fail)
    with pytest.raises(RetmaskError, match="No space left on device.* nothing there changed"):
        export_pairs(out, dest, overwrite=True, text=True)
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "gen"]  # no temporary directory left


def test_cli_exports_and_refuses_with_one_line_and_exit_1(tmp_path):
    out = write_run(tmp_path / "gen", MIXED)
    dest = tmp_path / "dest"
    done = retmask("export-pairs", str(out), "--to", str(dest), "--text", "--max-tokens", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    counts = "2 normal/retrieval_masked pairs (2 train) of 8 rows; removed: 2 empty, 1 identical, 2 truncated, " \
        "1 too long"
    assert counts in done.stdout
    assert (dest / "text" / "train-00000.parquet").exists()
    for args, needle in [((str(dest),), "not empty; pass --overwrite"),
                         ((str(tmp_path / "new"), "--chosen", "nope"), "it holds ['normal', 'retrieval_masked'")]:
        refused = retmask("export-pairs", str(out), "--to", *args)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("retmask: error:")]
        assert refused.returncode == 1 and len(errors) == 1 and needle in errors[0], refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr
    assert not (tmp_path / "new").exists()


def test_exporting_imports_neither_trl_nor_vllm(tmp_path):
    out = write_run(tmp_path / "gen", MIXED)
    code = (f"import sys; from pipeline.export import export_pairs; "
            f"export_pairs({str(out)!r}, {str(tmp_path / 'd')!r}); "
            "print(sorted(m for m in ('trl', 'vllm', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=child_env())
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-3000:]


@pytest.mark.slow
def test_trls_own_dpo_script_trains_one_step_on_the_exported_files(tmp_path, embedded_model_path):
    out = write_run(tmp_path / "gen", crafted_rows(12))
    dest = tmp_path / "dest"
    export_pairs(out, dest, test_fraction=0.25)
    files = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    trained = tmp_path / "trl-out"
    env = child_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    HF_DATASETS_CACHE=str(tmp_path / "hf-cache"))
    # TRL's script exactly as `trl dpo` runs it (that command only wraps it in `accelerate launch`)
    result = subprocess.run(
        [sys.executable, "-m", "trl.scripts.dpo", "--model_name_or_path", embedded_model_path,
         "--dataset_name", str(dest), "--output_dir", str(trained), "--max_steps", "1",
         "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_length", "64",
         "--report_to", "none", "--use_cpu", "true", "--bf16", "false", "--dtype", "float32",
         "--gradient_checkpointing", "false", "--save_strategy", "no", "--logging_steps", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "'loss'" in result.stdout + result.stderr
    assert (trained / "model.safetensors").stat().st_size > 100_000_000 and (trained / "config.json").exists()
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files  # read as exported, unchanged
