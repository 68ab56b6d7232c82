"""check_field_types: config mappings checked against dataclass annotations, YAML's number strings converted."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from retrieval_heads.config_types import check_field_types
from retrieval_heads.errors import RetmaskError

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@dataclass
class Inner:
    max_tokens: int = 16
    temperature: float = 0.6


@dataclass
class Outer:
    name: str = "x"
    rate: float = 1e-5
    steps: int = 1
    flag: bool = False
    limit: int | None = None
    tags: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    mode: Literal["fast", "slow"] = "fast"
    either: int | str = 0
    inner: Inner = field(default_factory=Inner)


def check(**data):
    return check_field_types(Outer, data, "c.yaml")


@pytest.mark.parametrize("key, given, expected", [
    ("rate", "1e-5", 1e-5), ("rate", " 0.5 ", 0.5), ("rate", 3, 3.0), ("rate", "-2", -2.0),
    ("steps", "16", 16), ("steps", 16.0, 16), ("steps", "1e3", 1000),
    ("flag", "TRUE", True), ("flag", "no", False), ("flag", "0", False),
    ("name", Path("a/b"), "a/b"), ("limit", None, None), ("limit", "4", 4),
    ("tags", "a, b", ["a", "b"]), ("tags", ("a",), ["a"]), ("weights", {"x": "1e-2"}, {"x": 0.01}),
    ("mode", "slow", "slow"), ("either", "word", "word"), ("either", 5, 5),
])
def test_unambiguous_values_are_converted_to_the_field_type(key, given, expected):
    got = check(**{key: given})[key]
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("key, given, message", [
    ("rate", "fast", "rate must be a number (e.g. 1e-5), got 'fast'"),
    ("rate", "nan", "rate must be a number"), ("rate", "1_000", "rate must be a number"),
    ("rate", float("inf"), "got inf (not a finite number)"), ("rate", "1e999", "got '1e999'"),
    ("rate", True, "rate must be a number (e.g. 1e-5), got True"),
    ("steps", 2.5, "steps must be an integer (e.g. 16), got 2.5"), ("steps", False, "steps must be an integer"),
    ("steps", None, "steps must be an integer (e.g. 16), got None (null)"),
    ("flag", 1, "flag must be true or false (e.g. true), got 1"), ("flag", "maybe", "flag must be true or false"),
    ("name", 7, "name must be a string"), ("name", ["a"], "name must be a string"),
    ("limit", "None", "limit must be an integer or null (e.g. 16), got 'None'"),
    ("tags", 3, "tags must be a list of strings"), ("tags", ["a", 2], "tags[1] must be a string"),
    ("options", [1], "options must be a mapping"), ("weights", {"x": "heavy"}, "weights.x must be a number"),
    ("mode", "medium", "mode must be one of 'fast', 'slow'"), ("either", 1.5, "either must be an integer or a string"),
    ("inner", 5, "inner must be a mapping of Inner fields"),
])
def test_wrong_types_are_one_line_naming_where_the_field_and_the_type(key, given, message):
    with pytest.raises(RetmaskError) as err:
        check(**{key: given})
    assert str(err.value).startswith("c.yaml: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_nested_dataclass_fields_are_checked_with_their_path():
    assert check(inner={"max_tokens": "16"})["inner"] == {"max_tokens": 16}
    with pytest.raises(RetmaskError, match=r"c.yaml: inner.max_tokens must be an integer \(e.g. 16\), got '16.5'"):
        check(inner={"max_tokens": "16.5"})
    with pytest.raises(RetmaskError, match="c.yaml: unknown Inner field inner.top_q; valid fields: max_tokens, temp"):
        check(inner={"top_q": 1})
    assert check(inner=Inner(3))["inner"] == Inner(3)


def test_unknown_fields_and_non_mappings_are_refused():
    with pytest.raises(RetmaskError, match="c.yaml: unknown Outer field nmae; valid fields: either, flag"):
        check(nmae="x")
    with pytest.raises(RetmaskError, match="c.yaml: expected a mapping of Outer fields, got \\['a'\\]"):
        check_field_types(Outer, ["a"], "c.yaml")


def test_the_input_mapping_is_not_changed():
    data = {"rate": "1e-5", "inner": {"max_tokens": "4"}}
    check_field_types(Outer, data, "c.yaml")
    assert data == {"rate": "1e-5", "inner": {"max_tokens": "4"}}


@pytest.mark.parametrize("name", ["demo.yaml", "generate_llama31_8b.yaml", "generate_olmo3_7b.yaml",
                                  "generate_qwen3_8b.yaml"])
def test_shipped_generate_configs_pass_unchanged(name):
    from pipeline.generate import GenerateConfig

    data = yaml.safe_load((CONFIGS / name).read_text())
    assert check_field_types(GenerateConfig, data, name) == data


def test_a_quoted_max_tokens_under_sampling_becomes_an_integer_for_generate_config(tmp_path):
    from pipeline.generate import GenerateConfig

    data = yaml.safe_load('sampling:\n  max_tokens: "16"\n  temperature: 7e-1\nthreshold: 1e-1\n')
    assert check_field_types(GenerateConfig, data, "g.yaml") == {"sampling": {"max_tokens": 16, "temperature": 0.7},
                                                                  "threshold": 0.1}
    with pytest.raises(RetmaskError, match="g.yaml: sampling.max_tokens must be an integer"):
        check_field_types(GenerateConfig, {"sampling": {"max_tokens": "many"}}, "g.yaml")
