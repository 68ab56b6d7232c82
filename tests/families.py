"""Tiny random-weight checkpoints of the RetMask paper's model families, built offline for the tests.

Each checkpoint takes the real model's ``config.json`` (tests/data/configs/, shipped for ``retmask plan``) and
shrinks only the sizes, so everything else the product must cope with stays as released: rope scaling, q/k
norms, sliding-window layer patterns, tied embeddings, several EOS ids. The tokenizer is the embedded
SmolLM2 tokenizer cut to its first 4096 BPE tokens (the full 49152-token vocabulary would make each
checkpoint tens of MB) plus the family's special tokens, and the family's real chat template.

Chat templates (tests/data/chat_templates/):
- ``llama3_1.jinja``: Llama-3.1-Instruct's template, byte for byte as TRL 1.16 ships it
  (``trl/chat_templates/llama3_1.jinja``, "original Llama 3.1 template"; TRL checks it weekly against the Hub).
- ``qwen3.jinja``: Qwen3's template (thinking switch ``enable_thinking``), from TRL 1.16 likewise
  (``trl/chat_templates/qwen3.jinja``).
- ``olmo3_instruct.jinja``: Olmo-3-7B-Instruct's template (``allenai/olmo-3-tokenizer-instruct-dev``). Taken
  from the Olmo-3.1-32B-Instruct template (the same template plus an Olmo identity in the default system
  prompt, per allenai/open-instruct's OLMo 3 tokenizer notes) as quoted in a public mlx-lm server script,
  with the 7B's default system sentence restored; its default rendering equals the one in transformers'
  Olmo3 integration test and ollama's Olmo3 renderer fixtures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).parent / "data"
VOCAB = 4096  # BPE tokens kept from the embedded tokenizer (bytes and the most frequent merges)


@dataclass(frozen=True)
class Family:
    """How to shrink one released model into a tiny checkpoint of the same architecture."""

    name: str
    real: str  # directory under tests/data/configs holding the released config.json
    template: str  # file under tests/data/chat_templates
    shape: dict  # size overrides of the released config
    bos: str | None
    eos: str  # the tokenizer's eos_token
    pad: str | None
    generation_eos: tuple[str, ...]  # generation_config.json's eos_token_id, in the released order
    special: tuple[str, ...] = ()  # the template's other special tokens
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's think tags)
    mask: tuple[tuple[int, int], ...] = ((0, 1), (1, 5), (3, 2))  # heads the engine tests ablate
    chat_template_kwargs: dict = field(default_factory=dict)  # the engine's, as in the paper's generate config


# initializer_range 0.1, not the released 0.02: at 0.02 attention is nearly uniform and the random model repeats
# one token whatever the context, so a gate that ablated the wrong heads could still produce identical tokens.
_SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=32, initializer_range=0.1)

FAMILIES = {
    # GQA 4:1 as released (32 query / 8 KV heads), llama3 rope scaling, untied embeddings; generation_config
    # lists three EOS ids (128001 <|end_of_text|>, 128008 <|eom_id|>, 128009 <|eot_id|>).
    "llama3.1": Family(
        "llama3.1", "Llama-3.1-8B-Instruct", "llama3_1.jinja", _SIZES,
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        special=("<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"),
    ),
    # q/k norms; head_dim (32) differs from hidden/heads (128/8) and embeddings are tied, as in the small
    # Qwen3 checkpoints (0.6B: hidden 1024, 16 heads of 128); Qwen3-8B's own config has neither.
    "qwen3": Family(
        "qwen3", "Qwen3-8B", "qwen3.jinja", {**_SIZES, "hidden_size": 128, "intermediate_size": 384,
                                            "tie_word_embeddings": True, "max_window_layers": 4},
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"),  # Qwen3's generation_config: 151645, 151643
        plain=("<think>", "</think>"),
        chat_template_kwargs={"enable_thinking": True},  # generation as jobs/configs/generate_qwen3_8b.yaml
    ),
    # q/k norms, yarn rope, multi-head attention (32/32 as released), three sliding-window layers per full
    # one; the window is cut to 48 tokens so test prompts reach past it. generation_config: <|im_end|>
    # (100265) and <|endoftext|> (100257), as open-instruct's Olmo-3 generation settings.
    "olmo3": Family(
        "olmo3", "Olmo-3-7B-Instruct", "olmo3_instruct.jinja",
        {**_SIZES, "num_key_value_heads": 8, "sliding_window": 48},
        bos=None, eos="<|endoftext|>", pad="<|pad|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
}


def small_tokenizer(embedded_model_path: str | Path, family: Family):
    """The embedded tokenizer cut to ``VOCAB`` BPE tokens, plus ``family``'s special tokens and template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((Path(embedded_model_path) / "tokenizer.json").read_text())
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < VOCAB}
    # A merge survives when its parts and its result do: every word still reduces to kept tokens (bytes at worst).
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < VOCAB]  # <|endoftext|>, <|im_start|>, ...
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    existing = set(tokenizer.get_vocab())
    wanted = [family.bos, family.eos, family.pad, *family.generation_eos, *family.special]
    new = [t for t in dict.fromkeys(wanted) if t and t not in existing]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, unk_token=None)
    fast.chat_template = (DATA / "chat_templates" / family.template).read_text()
    return fast


def build_checkpoint(family: Family, embedded_model_path: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write a bf16 random-weight checkpoint of ``family`` (config, weights, generation config, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    tokenizer = small_tokenizer(embedded_model_path, family)
    released = json.loads((DATA / "configs" / family.real / "config.json").read_text())
    ids = tokenizer.convert_tokens_to_ids
    config = {k: v for k, v in released.items() if k not in ("torch_dtype", "transformers_version", "architectures")}
    config.update(family.shape, vocab_size=len(tokenizer), dtype="bfloat16", use_cache=True,
                  bos_token_id=ids(family.bos) if family.bos else None,
                  pad_token_id=ids(family.pad) if family.pad else None,
                  eos_token_id=[ids(t) for t in family.generation_eos])
    if "layer_types" in config:  # keep the released pattern (Olmo-3: 3 sliding, 1 full) for the first layers
        config["layer_types"] = config["layer_types"][: config["num_hidden_layers"]]
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [ids(t) for t in family.generation_eos]
    model.generation_config.bos_token_id = hf_config.bos_token_id
    model.generation_config.pad_token_id = hf_config.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def eos_token_ids(family: Family, checkpoint: str | Path) -> list[int]:
    """The checkpoint's generation_config.json EOS ids (the tiny vocabulary's, in the released order)."""
    return json.loads((Path(checkpoint) / "generation_config.json").read_text())["eos_token_id"]
