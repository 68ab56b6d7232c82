"""TrainConfig: presets state the recipe, YAML maps 1:1 onto fields, batch math follows the world size."""

import dataclasses
from pathlib import Path

import pytest

from retrieval_heads.config import from_mapping
from retrieval_heads.errors import RetmaskError
from trainer.config import PRESETS, TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_paper_preset_is_the_retmask_recipe():
    c = TrainConfig.from_preset("paper")
    assert (c.learning_rate, c.lr_scheduler_type, c.min_lr, c.warmup_ratio) == (5e-7, "cosine_with_min_lr", 5e-8, 0.1)
    assert (c.weight_decay, c.adam_beta2, c.num_train_epochs, c.pairs_per_step) == (0.1, 0.95, 2.0, 512)
    assert (c.beta, c.loss_type, c.max_length, c.bf16, c.gradient_checkpointing, c.lora) == (
        0.1, "sigmoid", 1024, True, True, False)


def test_the_dataclass_defaults_are_the_paper_preset_and_the_default_preset():
    assert TrainConfig() == TrainConfig.from_preset("paper") == TrainConfig.load()
    assert TrainConfig.load(preset="demo") == TrainConfig.from_preset("demo")


def test_pairs_per_step_fixes_accumulation_for_any_world_size():
    c = TrainConfig.from_preset("paper")
    assert [c.grad_accumulation(w) for w in (1, 2, 4, 8)] == [256, 128, 64, 32]
    with pytest.raises(RetmaskError, match="not a multiple"):
        c.grad_accumulation(3)


def test_paper_preset_becomes_the_trl_config():
    args = TrainConfig.from_preset("paper", pairs="p").to_dpo_config(world_size=4)
    assert args.gradient_accumulation_steps == 64 and args.per_device_train_batch_size == 2
    assert args.lr_scheduler_kwargs == {"min_lr": 5e-8}
    assert args.warmup_steps == 0.1  # a ratio: transformers 5 reads floats below 1 as one
    assert (args.adam_beta2, args.weight_decay, args.beta, args.loss_type) == (0.95, 0.1, 0.1, ["sigmoid"])
    assert (args.max_length, args.truncation_mode, args.bf16, args.gradient_checkpointing) == (
        1024, "keep_start", True, True)
    assert args.eval_on_start is True
    assert TrainConfig.from_preset("paper").to_dpo_config(4, resuming=True).eval_on_start is False


def test_demo_preset_is_cpu_sized_with_the_same_loss():
    d, p = TrainConfig.from_preset("demo"), TrainConfig.from_preset("paper")
    assert (d.loss_type, d.beta) == (p.loss_type, p.beta)
    assert not d.bf16 and not d.gradient_checkpointing and d.dtype == "float32"
    assert d.grad_accumulation(1) == 4 and d.num_train_epochs == 1.0 and d.learning_rate > p.learning_rate


@pytest.mark.parametrize("name", ["paper", "demo"])
def test_shipped_yaml_matches_its_preset_field_for_field(name):
    from_yaml = TrainConfig.from_yaml(CONFIGS / f"train_{name}.yaml")
    from_preset = TrainConfig.from_preset(name)
    skip = {"pairs", "model", "output_dir"}
    differ = {f.name for f in dataclasses.fields(TrainConfig)
              if f.name not in skip and getattr(from_yaml, f.name) != getattr(from_preset, f.name)}
    assert differ == set()
    # every field is spelled out in the YAML
    import yaml

    keys = set(yaml.safe_load((CONFIGS / f"train_{name}.yaml").read_text()))
    assert keys == {f.name for f in dataclasses.fields(TrainConfig)}


def test_overrides_win_over_yaml_and_none_means_unset(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("preset: demo\nlearning_rate: 5e-7\nlora: true\nmax_length: 300\n")
    c = TrainConfig.from_yaml(path, max_length=128, lora=None, output_dir="o")
    assert c.learning_rate == 5e-7  # PyYAML reads 5e-7 as a string; it is coerced
    assert (c.max_length, c.lora, c.output_dir, c.preset) == (128, True, "o", "demo")
    assert c.pairs_per_step == PRESETS["demo"]["pairs_per_step"]


def test_bad_fields_and_values_are_one_line_errors(tmp_path):
    with pytest.raises(RetmaskError, match=r"overrides: unknown TrainConfig field lr; valid fields: "):
        TrainConfig.from_preset("demo", lr=1.0)
    with pytest.raises(RetmaskError, match="unknown preset 'fast'"):
        TrainConfig.from_preset("fast")
    with pytest.raises(RetmaskError, match=r"overrides: learning_rate must be a number \(e.g. 1e-5\), got 'fast'"):
        TrainConfig.from_preset("demo", learning_rate="fast")
    with pytest.raises(RetmaskError, match="warmup_ratio must be in"):
        TrainConfig.from_preset("demo", warmup_ratio=1.5)
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(RetmaskError, match="mapping"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    c = TrainConfig.from_preset("demo", lora=True, lora_target_modules="q_proj,v_proj")
    assert c.lora_target_modules == ["q_proj", "v_proj"]
    assert from_mapping(TrainConfig, c.to_dict()) == c
    (tmp_path / "c.yaml").write_text(c.to_yaml())
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == c


def test_every_field_documents_itself():
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))


def test_numbers_yaml_leaves_as_strings_are_converted_for_numeric_fields(tmp_path):
    # PyYAML (YAML 1.1) needs a dot in a float: 1e-5 loads as the string "1e-5"; quoted numbers are strings too
    path = tmp_path / "t.yaml"
    path.write_text('preset: demo\nlearning_rate: 1e-5\nmin_lr: "1e-6"\nmax_steps: "16"\nnum_train_epochs: 3\n'
                    'save_steps: 1e2\nlora: "yes"\n')
    c = TrainConfig.from_yaml(path)
    got = (c.learning_rate, c.min_lr, c.max_steps, c.num_train_epochs, c.save_steps, c.lora)
    assert got == (1e-5, 1e-6, 16, 3.0, 100, True)
    assert type(c.num_train_epochs) is float and type(c.max_steps) is int and type(c.save_steps) is int


@pytest.mark.parametrize("line, message", [
    ("learning_rate: fast", "learning_rate must be a number (e.g. 1e-5), got 'fast'"),
    ("learning_rate: .nan", "learning_rate must be a number (e.g. 1e-5), got nan (not a finite number)"),
    ("max_steps: 2.5", "max_steps must be an integer (e.g. 16), got 2.5"),
    ("max_steps: true", "max_steps must be an integer (e.g. 16), got True"),
    ("lora: 2", "lora must be true or false (e.g. true), got 2"),
    ("model: 7", "model must be a string (e.g. \"text\"), got 7"),
    ("output_dir: 2024-01-01", "output_dir must be a string (e.g. \"text\"), got datetime.date(2024, 1, 1) (YAML"),
    ("max_length: [1]", "max_length must be an integer or null (e.g. 16), got [1]"),
    ("lora_target_modules: {q_proj: 1}", "lora_target_modules must be a list of strings"),
    ("lora_target_modules: [q_proj, 3]", "lora_target_modules[1] must be a string"),
    ("beta:", "beta must be a number (e.g. 1e-5), got None (null)"),
])
def test_a_wrongly_typed_yaml_value_is_one_line_naming_the_file_the_field_and_the_type(tmp_path, line, message):
    path = tmp_path / "t.yaml"
    path.write_text(f"preset: demo\n{line}\n")
    with pytest.raises(RetmaskError) as err:
        TrainConfig.from_yaml(path)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_cli_style_string_overrides_are_converted_or_refused_naming_the_field():
    c = TrainConfig.from_preset("demo", learning_rate="2e-5", max_steps="3", lora="false",
                                lora_target_modules="q_proj, v_proj")
    assert (c.learning_rate, c.max_steps, c.lora, c.lora_target_modules) == (2e-5, 3, False, ["q_proj", "v_proj"])
    with pytest.raises(RetmaskError, match=r"overrides: max_steps must be an integer \(e.g. 16\), got '3.5'"):
        TrainConfig.from_preset("demo", max_steps="3.5")
    with pytest.raises(RetmaskError, match=r"config: beta must be a number"):
        from_mapping(TrainConfig, {**TrainConfig.from_preset("demo").to_dict(), "beta": "strong"}, "config")


def test_off_policy_training_is_opt_in():
    assert TrainConfig.from_preset("paper").allow_off_policy is False
    assert TrainConfig.from_preset("demo", allow_off_policy="true").allow_off_policy is True
