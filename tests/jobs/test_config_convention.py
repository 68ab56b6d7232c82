"""One config convention: every stage config is documented, has a YAML in jobs/configs/, and the CLI's
options are derived from it, so a default lives in exactly one place."""

import dataclasses
from pathlib import Path

import pytest
import typer.main
import yaml

from jobs.cli import cli
from jobs.demo import DemoConfig
from jobs.generate import PlanTarget
from jobs.study import StudyConfig
from jobs.train import RayWorkers
from pipeline.evaluation.config import EvalConfig
from pipeline.export import ExportConfig
from pipeline.generate import GenerateConfig
from pipeline.serve import ServeConfig
from retrieval_heads.ablation import AblationConfig
from retrieval_heads.config import default_of, help_of, load_config, undocumented_fields
from retrieval_heads.detect import DetectConfig
from retrieval_heads.masking import MaskExportConfig
from trainer.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
STAGES = {DetectConfig: "detect.yaml", AblationConfig: "ablate.yaml", MaskExportConfig: "export_masked.yaml",
          GenerateConfig: "demo.yaml", TrainConfig: "train_paper.yaml", EvalConfig: "eval.yaml",
          DemoConfig: "demo_run.yaml", PlanTarget: None, RayWorkers: None,
          StudyConfig: "study.yaml", ExportConfig: "export_pairs.yaml", ServeConfig: "serve.yaml"}
# YAMLs that spell out the defaults (the others are recipes: a model's generation, the paper's DPO)
DEFAULTS_YAML = ("detect.yaml", "ablate.yaml", "export_masked.yaml", "eval.yaml", "demo_run.yaml", "study.yaml",
                 "export_pairs.yaml", "serve.yaml")
# options that are not config fields: where to write, which YAML, output format, the eval's model list
NOT_FIELDS = {"config", "out", "as_json", "models", "to"}
# commands whose options are arguments of a library function rather than a stage config
UNDERIVED = {"fetch-model", "inspect", "heads"}


@pytest.mark.parametrize("cls", list(STAGES), ids=lambda c: c.__name__)
def test_every_field_of_every_stage_config_has_help(cls):
    assert undocumented_fields(cls) == []


@pytest.mark.parametrize("cls, name", [(c, n) for c, n in STAGES.items() if n], ids=lambda x: getattr(x, "__name__", x))
def test_every_stage_has_a_yaml_that_loads_into_its_config(cls, name):
    data = yaml.safe_load((CONFIGS / name).read_text())
    assert set(data) <= {f.name for f in dataclasses.fields(cls)}
    loader = getattr(cls, "from_yaml", None)
    config = loader(CONFIGS / name) if loader else load_config(cls, CONFIGS / name)
    assert isinstance(config, cls)
    if name in DEFAULTS_YAML:  # written out in full, at the dataclass's defaults
        assert set(data) == {f.name for f in dataclasses.fields(cls)}
        assert config == cls()


def _commands():
    group = typer.main.get_command(cli)
    for name, command in group.commands.items():
        if name not in UNDERIVED:
            yield name, command


@pytest.mark.parametrize("name, command", list(_commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_cli_options_are_derived_from_the_stage_dataclass(name, command):
    derived = {}  # python parameter -> (config class, field), one cli_options layer after the other
    callback = command.callback
    while callback is not None and hasattr(callback, "derived_options"):
        derived.update({p: (callback.config_class, f) for p, (f, _) in callback.derived_options.items()})
        callback = getattr(callback, "inner", None)
    assert derived, f"{name} declares its options by hand"
    for param in command.params:
        if param.name in NOT_FIELDS:
            continue
        assert param.name in derived, f"retmask {name} --{param.name} is declared by hand, not derived"
        cls, field = derived[param.name]
        if not param.required:
            assert param.default is None  # "not given": the YAML, then the dataclass decide
            assert param.show_default == _shown(default_of(cls, field))
        assert param.help.startswith(help_of(cls, field))


def _shown(value):
    from retrieval_heads.config import _shown

    return _shown(value)


def test_a_flag_wins_over_the_yaml_which_wins_over_the_dataclass(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("num_needles: 2\nlengths: [100, 200]\n")
    config = load_config(DetectConfig, path, lengths="300", max_new_tokens=None)
    assert (config.num_needles, config.lengths, config.max_new_tokens) == (2, (300,), DetectConfig().max_new_tokens)


def test_nested_overrides_merge_into_the_yaml_section(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("sampling: {temperature: 0.9, max_tokens: 64}\n")
    config = load_config(GenerateConfig, path, sampling={"max_tokens": 8})
    assert (config.sampling.temperature, config.sampling.max_tokens) == (0.9, 8)
