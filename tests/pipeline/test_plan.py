"""`retmask plan`: the paper's generation configs checked from each model's real config.json alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, SMALL, child_env, prompt_rows, retmask, write_prompts, write_scores

CONFIGS = REPO / "tests" / "data" / "configs"
PAPER = {  # paper config -> the shipped config.json directory of its model, and that model's heads
    "generate_llama31_8b.yaml": ("Llama-3.1-8B-Instruct", 32, 32),
    "generate_qwen3_8b.yaml": ("Qwen3-8B", 36, 32),
    "generate_olmo3_7b.yaml": ("Olmo-3-7B-Instruct", 32, 32),
}
SECTIONS = ["shape", "variants", "tensor parallel", "memory per engine", "prompt source", "output location"]
PAPER_HEADS = ((3, 1), (17, 5), (20, 30))  # the heads the paper configs' score files below select


def write_lmsys(path: Path, n: int = 6) -> Path:
    """LMSYS-Chat-1M-Synth-shaped records (the paper configs' source): n usable, one redacted, one bad line."""
    rows = [{"conversation_id": f"c{i}", "conversation": [{"role": "user", "content": f"Explain topic {i} briefly."},
                                                          {"role": "assistant", "content": "..."}]} for i in range(n)]
    rows.append({"conversation_id": "r", "redacted": True, "conversation": [{"role": "user", "content": "hidden"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    return path


@pytest.fixture
def paper_inputs(tmp_path):
    """Per paper config: the CLI overrides that point it at the shipped config.json and small local inputs."""
    prompts = write_lmsys(tmp_path / "lmsys.jsonl")

    def overrides(name: str, **extra) -> dict:
        model, layers, heads = PAPER[name]
        scores = write_scores(tmp_path / f"{model}-scores.json", layers, heads, PAPER_HEADS)
        return {"model": str(CONFIGS / model), "scores": str(scores), "prompts": str(prompts),
                "out": str(tmp_path / "out" / model), **extra}

    return overrides


def run_plan(name: str, overrides: dict, **options):
    from pipeline.generate import GenerateConfig
    from pipeline.plan import format_plan, plan
    from retrieval_heads.config import load_config

    config = load_config(GenerateConfig, REPO / "jobs" / "configs" / name, **overrides)
    report = plan(config, **options)
    return report, format_plan(report)


def cli_args(name: str, overrides: dict) -> list[str]:
    args = ["plan", "--config", str(REPO / "jobs" / "configs" / name)]
    for key, value in overrides.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def titles_in(text: str) -> list[str]:
    return [line[3:-3] for line in text.splitlines() if line.startswith("== ")]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_paper_config_plans_from_config_json_alone(name, paper_inputs, tmp_path):
    report, text = run_plan(name, paper_inputs(name))
    assert report.problems == [], text
    assert titles_in(text) == SECTIONS
    model, layers, heads = PAPER[name]
    assert f"{layers} layers x {heads} query heads" in text
    assert "matches" in text and "-> 3 heads" in text  # the score file fits; threshold 0.1 selects the 3 heads
    assert report.values["heads"]["retrieval_masked"] == [(3, 1), (17, 5), (20, 30)]
    assert "rank 0 gates 3 local heads" in text
    assert report.values["engines_per_node"] == 8  # TP 1 on 8 GPUs
    assert (report.values["rows"], report.values["usable"]) == (8, 6)
    assert report.values["rejects"] == {"redacted": 1, "invalid JSON": 1}
    assert "token-length check" in text and "skipped" in text  # the directory holds config.json only
    assert report.values["output"] == "new" and not (tmp_path / "out").exists()  # nothing written there


def test_olmo3_plan_names_its_sliding_window_layers(paper_inputs):
    report, text = run_plan("generate_olmo3_7b.yaml", paper_inputs("generate_olmo3_7b.yaml"))
    assert "24 of 32 layers attend within a sliding window of 4096 tokens" in text
    assert "upper bound" in text


def test_plan_imports_neither_vllm_nor_ray_and_exits_0(paper_inputs):
    args = cli_args("generate_llama31_8b.yaml", paper_inputs("generate_llama31_8b.yaml"))
    code = ("import sys; from jobs.cli import cli\n"
            "try:\n    cli(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('IMPORTED', sorted(m for m in ('vllm', 'ray') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                            env=child_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout
    assert "no problems found" in result.stdout


@pytest.mark.parametrize("name, tp, reason", [
    ("generate_llama31_8b.yaml", 3, "tensor_parallel_size=3 does not divide the 32 query heads"),
    ("generate_qwen3_8b.yaml", 16, "tensor_parallel_size=16 exceeds the 8 GPUs of a node"),
])
def test_a_tensor_parallel_size_that_cannot_work_is_refused(name, tp, reason, paper_inputs):
    report, text = run_plan(name, paper_inputs(name, tensor_parallel_size=tp))
    assert [p for p in report.problems if reason in p], text
    assert titles_in(text) == SECTIONS  # the whole report is still printed


def test_cli_refuses_tp_3_for_32_heads_in_one_line_after_the_whole_report(paper_inputs):
    overrides = paper_inputs("generate_llama31_8b.yaml", tensor_parallel_size=3)
    result = retmask(*cli_args("generate_llama31_8b.yaml", overrides))
    assert result.returncode == 1
    assert titles_in(result.stdout) == SECTIONS
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("retmask: error: plan found 1 problem: tensor parallel:")
    assert "does not divide the 32 query heads; use a divisor of 32" in errors[0]


def test_cli_refuses_a_score_file_of_another_shape_in_one_line(paper_inputs, tmp_path):
    scores = write_scores(tmp_path / "qwen-shaped.json", 36, 32, PAPER_HEADS)  # Qwen3-8B's 36 layers for Llama's 32
    overrides = {**paper_inputs("generate_llama31_8b.yaml"), "scores": str(scores)}
    result = retmask(*cli_args("generate_llama31_8b.yaml", overrides))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"score file {scores} has head 32-0, outside this model's 32 layers" in errors[0]
    assert "not computed: the score file does not fit this model" in result.stdout


def test_cli_refuses_an_output_under_a_regular_file_in_one_line(paper_inputs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    overrides = {**paper_inputs("generate_llama31_8b.yaml"), "out": str(blocker / "run")}
    result = retmask(*cli_args("generate_llama31_8b.yaml", overrides))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"output location: not writable: {blocker} is a file" in errors[0]
    assert blocker.read_text() == "not a directory"


def test_cli_names_a_local_directory_when_the_hub_cannot_be_reached(tmp_path):
    result = retmask("plan", "--config", str(REPO / "jobs" / "configs" / "generate_qwen3_8b.yaml"),
                     env=child_env(HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Qwen/Qwen3-8B" in errors[0]
    assert "pass --model a local directory holding the model's config.json" in errors[0]


def test_memory_counts_weights_and_kv_cache_and_refuses_a_gpu_too_small(paper_inputs):
    report, text = run_plan("generate_llama31_8b.yaml", paper_inputs("generate_llama31_8b.yaml"))
    assert report.values["params"] == 8_030_261_248 and report.values["weights_bytes"] == 2 * 8_030_261_248
    assert "128 KiB per token per GPU" in text  # 2 x 32 layers x 8 KV heads x 128 x 2 bytes
    assert "57 sequences of full length fit at once" in text  # (0.9 x 80 - 15.0) GiB / (8192 x 128 KiB)
    report, _ = run_plan("generate_llama31_8b.yaml", paper_inputs("generate_llama31_8b.yaml"), gpu_memory_gb=16)
    assert [p for p in report.problems if p.startswith("memory per engine: weights need 15.0 GiB per GPU")]
    report, _ = run_plan("generate_llama31_8b.yaml", paper_inputs("generate_llama31_8b.yaml", tensor_parallel_size=2),
                         gpu_memory_gb=16)
    assert report.problems == []  # half the weights per GPU leave room for the KV cache


def test_the_scan_stops_at_max_rows(tmp_path, paper_inputs):
    rows = [{"conversation": [{"role": "user", "content": f"question {i}"}]} for i in range(300)]
    (tmp_path / "many.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    overrides = {**paper_inputs("generate_llama31_8b.yaml"), "prompts": str(tmp_path / "many.jsonl")}
    report, text = run_plan("generate_llama31_8b.yaml", overrides, max_rows=50)
    assert report.values["rows"] == 50 and "stopped at the cap" in text
    report, text = run_plan("generate_llama31_8b.yaml", overrides, max_rows=None)
    assert report.values["rows"] == 300 and "the whole source" in text


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameter_estimate_equals_the_model_built_from_config_json(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.placement import parameter_count

    config = AutoConfig.from_pretrained(CONFIGS / PAPER[name][0])
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_shipped_olmo3_think_config_has_the_instruct_architecture():
    think = json.loads((CONFIGS / "Olmo-3-7B-Think" / "config.json").read_text())
    instruct = json.loads((CONFIGS / "Olmo-3-7B-Instruct" / "config.json").read_text())
    assert think == instruct and think["model_type"] == "olmo3"


def test_engine_uses_the_placement_functions_and_plan_reads_the_engine_s_defaults():
    from pipeline import engine, gate, gate_tables, placement
    from pipeline.generate import GenerateConfig

    # plan's memory check reads GenerateConfig.engine: the very options (and defaults) the engine is built with
    assert issubclass(engine.EngineConfig, engine.EngineOptions)
    options, built = GenerateConfig().engine, engine.EngineConfig()
    for name in ("dtype", "gpu_memory_utilization", "max_num_seqs", "kv_cache_memory_bytes"):
        assert getattr(options, name) == getattr(built, name)
    assert engine.check_tensor_parallel is placement.check_tensor_parallel
    assert gate_tables.local_heads is placement.local_heads
    assert gate_tables.check_tensor_parallel is placement.check_tensor_parallel
    assert gate.MAX_MASKS is engine.MAX_MASKS is placement.MAX_MASKS
    shared = {name for name in vars(placement) if not name.startswith("_")}
    own = {name for m in (engine, gate, gate_tables) for name, v in vars(m).items()
           if getattr(v, "__module__", None) == m.__name__}
    assert not own & shared  # no second copy of the placement arithmetic in the vLLM-side modules


def test_an_output_of_another_run_or_of_other_files_is_refused(paper_inputs, tmp_path):
    from pipeline.shard_writer import open_run

    overrides = paper_inputs("generate_llama31_8b.yaml")
    writer = open_run(overrides["out"], {"model": {"id": "someone-else", "hash": "sha256:0"}, "seed": 0},
                      ["normal", "retrieval_masked"])
    writer.close()
    report, text = run_plan("generate_llama31_8b.yaml", overrides)
    refused = [p for p in report.problems if p.startswith("output location: refused:")]
    assert len(refused) == 1 and 'model.id is "someone-else" there but "Llama-3.1-8B-Instruct" now' in refused[0]

    other = tmp_path / "holiday-photos"
    other.mkdir()
    (other / "beach.jpg").write_bytes(b"\xff\xd8")
    report, _ = run_plan("generate_llama31_8b.yaml", {**overrides, "out": str(other)})
    assert [p for p in report.problems if "already holds files but no manifest.json" in p]
    assert sorted(os.listdir(other)) == ["beach.jpg"]


# --- the output location, on the embedded model (weights and tokenizer here, as generate sees them) ---

def embedded_config(tmp_path, **fields):
    from pipeline.generate import GenerateConfig
    from retrieval_heads.config import from_mapping

    long_prompt = {"id": "long", "prompt": "Summarize this: " + "lorem ipsum dolor sit amet " * 200}
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_rows(5) + [long_prompt])
    return from_mapping(GenerateConfig, {**SMALL, "scores": str(write_scores(tmp_path / "scores.json")),
                                         "prompts": str(prompts), "out": str(tmp_path / "run"), **fields})


def commit_rows_as_generate_would(config, n: int) -> None:
    """Open the run with the very run config generate computes, and commit ``n`` rows."""
    from transformers import AutoConfig

    from pipeline.run_config import chat_tokenizer, model_record, run_config, variant_masks
    from pipeline.shard_schema import make_row
    from pipeline.shard_writer import open_run
    from retrieval_heads.models import shape_of

    path, model = model_record(config)
    hf_config = AutoConfig.from_pretrained(path)
    _, record = variant_masks(config, shape_of(hf_config))
    recorded = run_config(config, model, record, hf_config, chat_tokenizer(path, config.model))
    writer = open_run(config.out, recorded, config.variants)
    outputs = {v: ("ok", 1, "stop") for v in config.variants}
    rows = [make_row(r["id"], r["prompt"], 0, 10, outputs) for r in prompt_rows(n)]
    writer.write_shard(rows)
    writer.close()


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_plan_says_a_run_resumes_and_refuses_a_different_one_without_writing(tmp_path, embedded_model_path):
    from pipeline.plan import format_plan, plan

    config = embedded_config(tmp_path)
    report = plan(config)
    assert report.values["output"] == "new" and not (tmp_path / "run").exists()
    assert report.values["rejects"] == {"too long": 1}  # the tokenizer is here: the length check ran
    commit_rows_as_generate_would(config, 3)
    before = snapshot(tmp_path / "run")

    report = plan(config)
    assert report.problems == [], format_plan(report)
    assert "resumes 3 committed prompts" in format_plan(report)
    assert "not compared" not in format_plan(report)  # weights and tokenizer here: every identity key compared

    report = plan(embedded_config(tmp_path, seed=1))
    refused = [p for p in report.problems if p.startswith("output location: refused:")]
    assert len(refused) == 1 and "seed is 0 there but 1 now" in refused[0]
    assert snapshot(tmp_path / "run") == before
