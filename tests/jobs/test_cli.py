"""Bad input reaches the user as one clear line and a non-zero exit, never a traceback."""

import pytest
from support import assert_user_error, retmask, write_scores

HEAD = [(17, 3)]  # the one head the score files below select


def test_unknown_model_alias(tmp_path):
    assert_user_error(retmask("detect", "--model", "smollm9-1t", "--out", str(tmp_path)), "unknown model 'smollm9-1t'")


def test_score_file_shape_does_not_match_model(tmp_path, embedded_model_path):
    scores = write_scores(tmp_path / "s.json", layers=32, heads=32, retrieval=HEAD)
    result = retmask("export-masked", "--model", embedded_model_path, "--scores", str(scores),
                     "--out", str(tmp_path / "m"))
    assert_user_error(result, "s.json", "outside this model's 30 layers x 9 heads")


def test_empty_score_file(tmp_path, embedded_model_path):
    (tmp_path / "s.json").write_text("")
    result = retmask("ablate", "--model", embedded_model_path, "--scores", str(tmp_path / "s.json"),
                     "--out", str(tmp_path))
    assert_user_error(result, "s.json", "not readable JSON")


def test_niah_length_above_the_models_context(tmp_path, embedded_model_path):
    result = retmask("detect", "--model", embedded_model_path, "--lengths", "1000,9000", "--out", str(tmp_path))
    assert_user_error(result, "context is 8192")


@pytest.mark.slow
def test_export_masked_zeroes_exactly_the_selected_heads(tmp_path, embedded_model_path):
    from safetensors.torch import load_file

    scores = write_scores(tmp_path / "s.json", retrieval=HEAD)
    result = retmask("export-masked", "--model", embedded_model_path, "--scores", str(scores),
                     "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    weights = load_file(tmp_path / "m" / "model.safetensors")
    o_proj = weights["model.layers.17.self_attn.o_proj.weight"]
    assert o_proj[:, 3 * 64 : 4 * 64].abs().sum() == 0
    assert o_proj[:, 2 * 64 : 3 * 64].abs().sum() > 0
    assert weights["model.layers.16.self_attn.o_proj.weight"].abs().sum() > 0
