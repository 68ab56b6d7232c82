"""Chat rendering: one function gives detection, generation and evaluation the same prompt text."""

from pathlib import Path

import pytest

from retrieval_heads.models import render_chat

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("retrieval_heads", "pipeline", "trainer", "jobs")


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)


def test_a_string_is_one_user_turn_and_the_generation_prompt_is_optional(tokenizer):
    question = "Where is the key?"
    text = render_chat(tokenizer, question)
    assert text == render_chat(tokenizer, [{"role": "user", "content": question}])
    assert question in text and text.endswith("<|im_start|>assistant\n")  # SmolLM2's template
    bare = render_chat(tokenizer, question, generation_prompt=False)
    assert text.startswith(bare) and not bare.endswith("<|im_start|>assistant\n")


def test_template_kwargs_reach_the_template(tokenizer):
    qwen3 = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    qwen3.chat_template = (REPO / "tests" / "data" / "chat_templates" / "qwen3.jinja").read_text()
    assert render_chat(qwen3, "hi", enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    assert not render_chat(qwen3, "hi").endswith("</think>\n\n")


def test_every_stage_renders_chat_through_render_chat():
    callers = sorted(str(p.relative_to(REPO)) for package in PRODUCT for p in (REPO / package).rglob("*.py")
                     if "apply_chat_template(" in p.read_text())
    assert callers == ["retrieval_heads/models.py"]
