"""Bad input reaches the user as one clear line and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest


def retmask(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 1, result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("retmask: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0]


def wu_file(path, layers=30, heads=9):
    path.write_text(json.dumps({f"{l}-{h}": [0.5 if (l, h) == (17, 3) else 0.0] for l in range(layers) for h in range(heads)}))
    return path


def test_unknown_model_alias(tmp_path):
    assert_one_line_error(retmask("detect", "--model", "smollm9-1t", "--out", str(tmp_path)), "unknown model 'smollm9-1t'")


def test_score_file_shape_does_not_match_model(tmp_path, embedded_model_path):
    scores = wu_file(tmp_path / "s.json", layers=32, heads=32)
    result = retmask("export-masked", "--model", embedded_model_path, "--scores", str(scores), "--out", str(tmp_path / "m"))
    assert_one_line_error(result, "s.json", "outside this model's 30 layers x 9 heads")


def test_empty_score_file(tmp_path, embedded_model_path):
    (tmp_path / "s.json").write_text("")
    result = retmask("ablate", "--model", embedded_model_path, "--scores", str(tmp_path / "s.json"), "--out", str(tmp_path))
    assert_one_line_error(result, "s.json", "not readable JSON")


def test_niah_length_above_the_models_context(tmp_path, embedded_model_path):
    result = retmask("detect", "--model", embedded_model_path, "--lengths", "1000,9000", "--out", str(tmp_path))
    assert_one_line_error(result, "context is 8192")


@pytest.mark.slow
def test_export_masked_zeroes_exactly_the_selected_heads(tmp_path, embedded_model_path):
    from safetensors.torch import load_file

    scores = wu_file(tmp_path / "s.json")
    result = retmask("export-masked", "--model", embedded_model_path, "--scores", str(scores), "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    weights = load_file(tmp_path / "m" / "model.safetensors")
    o_proj = weights["model.layers.17.self_attn.o_proj.weight"]
    assert o_proj[:, 3 * 64 : 4 * 64].abs().sum() == 0
    assert o_proj[:, 2 * 64 : 3 * 64].abs().sum() > 0
    assert weights["model.layers.16.self_attn.o_proj.weight"].abs().sum() > 0
