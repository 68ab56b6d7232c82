"""Real TRL DPO steps: learning on the embedded model, resume, LoRA with a precomputed reference, outputs."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from support import REPO, child_env, crafted_rows

from pipeline.shards import read_manifest
from retrieval_heads.errors import RetmaskError
from trainer.config import TrainConfig
from trainer.data import pairs_digest
from trainer.dpo import train


def tiny_config(pairs, out, model, **overrides) -> TrainConfig:
    base = dict(pairs=str(pairs), output_dir=str(out), model=model, max_length=128, per_device_batch_size=2,
                pairs_per_step=2, eval_batch_size=8, eval_fraction=0.1, save_steps=1, warmup_ratio=0.0)
    return TrainConfig.from_preset("demo", **{**base, **overrides})


@pytest.mark.slow
def test_demo_run_on_the_embedded_model_lowers_heldout_loss_and_raises_reward_accuracy(make_shards, embedded_model_path,
                                                                                       tmp_path):
    # Chosen answers use a fact from the prompt, rejected ones ignore it: two steps at the demo learning rate
    # must already separate them on prompts the model never trained on.
    pairs = make_shards(crafted_rows(24, seed=1), model=embedded_model_path)  # 7 held out
    config = TrainConfig.from_preset(
        "demo", pairs=str(pairs), output_dir=str(tmp_path / "run"), max_length=256, max_steps=2, warmup_ratio=0.0,
        per_device_batch_size=4, pairs_per_step=4, eval_batch_size=8, eval_fraction=0.15, save_steps=100,
    )
    final = train(config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    start, end = metrics["eval_start"], metrics["eval_end"]
    assert metrics["data"]["eval"] == 7
    assert start["step"] == 0 and start["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert end["loss"] < start["loss"] - 0.05
    assert end["rewards/accuracies"] > start["rewards/accuracies"] + 0.5
    assert end["rewards/margins"] > 0
    assert [r["step"] for r in metrics["train"]] == [1, 2]
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000


def test_rerun_resumes_from_the_last_checkpoint(crafted_pairs_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(crafted_pairs_dir, out, tiny_checkpoint, max_steps=2))
    assert (out / "checkpoint-2").is_dir()
    (out / "checkpoint-9").mkdir()  # a save killed midway: no trainer_state.json
    final = train(tiny_config(crafted_pairs_dir, out, tiny_checkpoint, max_steps=4))
    assert not (out / "checkpoint-9").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-2"
    assert metrics["global_step"] == 4
    assert [r["step"] for r in metrics["train"]] == [1, 2, 3, 4]  # history carried over, no step repeated
    assert [e["step"] for e in metrics["eval"]] == [0, 4]  # step-0 eval kept from the first run, not redone
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["max_steps"] == 4 and saved["world_size"] == 1 and saved["gradient_accumulation_steps"] == 1
    assert json.loads((out / "data_stats.json").read_text())["pairs"] == 48
    # the pairs' identity and both models are recorded where the resume check reads them
    digest = pairs_digest(read_manifest(crafted_pairs_dir))
    assert saved["pairs_digest"] == digest == metrics["data"]["pairs_digest"] and saved["pairs_rows"] == 48
    assert saved["provenance"]["off_policy"] is False
    assert saved["provenance"]["policy"]["hash"] == saved["provenance"]["pairs_model"]["hash"]

    with pytest.raises(RetmaskError, match="holds a run with rejected='retrieval_masked'"):
        train(tiny_config(crafted_pairs_dir, out, tiny_checkpoint, max_steps=6, rejected="random_masked"))
    # the same pairs under another path (moved, copied): content identity, so the run resumes (no step left)
    moved = shutil.copytree(crafted_pairs_dir, tmp_path / "moved-pairs")
    train(tiny_config(moved, out, tiny_checkpoint, max_steps=4))
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == "checkpoint-4"


def test_lora_with_precomputed_reference_saves_an_adapter(make_shards, tiny_checkpoint, tmp_path):
    pairs = make_shards(crafted_rows(20), model=tiny_checkpoint)
    config = tiny_config(pairs, tmp_path / "lora", tiny_checkpoint, max_steps=2, lora=True,
                         precompute_ref_log_probs=True, precompute_ref_batch_size=8, eval_fraction=0.2,
                         lora_target_modules=["q_proj", "v_proj"], save_steps=100)
    final = train(config)
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert metrics["eval_start"]["loss"] == pytest.approx(0.6931, abs=1e-3)  # adapter starts as a no-op
    assert metrics["eval_end"] is not None


def test_paper_preset_trains_with_bf16_autocast_and_gradient_checkpointing_on_cpu(crafted_pairs_dir, tiny_checkpoint,
                                                                                  tmp_path):
    # the recipe's code path (bf16, checkpointing, cosine_with_min_lr, warmup), on the tiny model
    config = TrainConfig.from_preset("paper", pairs=str(crafted_pairs_dir), output_dir=str(tmp_path / "paper"),
                                     model=tiny_checkpoint, max_length=128, pairs_per_step=4, per_device_batch_size=2,
                                     max_steps=2, eval_batch_size=8, eval_fraction=0.1, save_steps=100)
    train(config)
    metrics = json.loads((tmp_path / "paper" / "metrics.json").read_text())
    assert [r["learning_rate"] for r in metrics["train"]] == [0.0, 5e-7]  # 1 warmup step of 2, then the peak
    saved = yaml.safe_load((tmp_path / "paper" / "train_config.yaml").read_text())
    assert saved["gradient_accumulation_steps"] == 2 and saved["bf16"] and saved["gradient_checkpointing"]


def test_trainer_never_imports_vllm():
    code = ("import sys, trainer, trainer.data, trainer.config, trainer.dpo, trainer.ray_train; "
            "print(sorted(m for m in ('vllm',) if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
