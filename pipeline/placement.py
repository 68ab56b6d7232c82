"""Where heads and bytes land on GPUs: tensor-parallel head placement and memory arithmetic, vLLM-free.

The gated engine (``pipeline.engine``) uses these to map global heads to a rank's local heads and to refuse
a context or KV cache that cannot work; ``retmask plan`` (``pipeline.plan``) uses the same functions to
answer those questions from a model's ``config.json`` alone, on a machine without vLLM or a GPU. So this
module imports neither vLLM nor torch: only the model shape and plain numbers.

vLLM's rules mirrored here (0.1x through 0.3x): ``o_proj`` is row-parallel, so rank r holds the input
channels of query heads ``[r * heads/tp, (r+1) * heads/tp)``; KV heads are split when tp <= KV heads and
replicated when tp is a multiple of them; the KV cache is allocated in whole blocks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import ModelShape
from retrieval_heads.scores import Head

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
KV_BLOCK_TOKENS = 256  # the largest block vLLM uses (CPU); GPU blocks are 16 tokens, so this errs high
# Rows of each o_proj gate table (pipeline.gate): row 0 the engine-wide gate, the rest per-request masks. Here so
# the driver can refuse a run with more masks than one mixed batch holds without importing vLLM.
MAX_MASKS = 16


# --- tensor parallel: which rank holds which query head ---

def check_tensor_parallel(shape: ModelShape, tp_size: int) -> int:
    """Validate ``tp_size`` for this shape as vLLM does; return the query heads per rank."""
    if tp_size < 1 or shape.num_heads % tp_size:
        raise RetmaskError(
            f"tensor_parallel_size={tp_size} does not divide the {shape.num_heads} query heads; "
            f"use a divisor of {shape.num_heads}"
        )
    kv = shape.num_kv_heads
    # vLLM splits KV heads when tp <= kv heads and replicates them when tp is a multiple of kv heads.
    if (tp_size <= kv and kv % tp_size) or (tp_size > kv and tp_size % kv):
        raise RetmaskError(
            f"tensor_parallel_size={tp_size} neither divides nor is a multiple of the {kv} KV heads; "
            f"use a size that does (vLLM requires it)"
        )
    return shape.num_heads // tp_size


def head_to_rank(layer: int, head: int, shape: ModelShape, tp_size: int) -> tuple[int, int]:
    """Global query head -> (tensor-parallel rank, local head index on that rank's ``o_proj``)."""
    per_rank = check_tensor_parallel(shape, tp_size)
    if not (0 <= layer < shape.num_layers and 0 <= head < shape.num_heads):
        raise RetmaskError(f"head {layer}-{head} is out of range for {shape.num_layers}x{shape.num_heads} heads")
    # o_proj is row-parallel: rank r holds input channels of query heads [r*per_rank, (r+1)*per_rank).
    return head // per_rank, head % per_rank


def local_heads(heads: Sequence[Head], shape: ModelShape, tp_size: int, rank: int) -> dict[int, list[int]]:
    """The local heads ``rank`` must gate, by layer."""
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        owner, local = head_to_rank(layer, head, shape, tp_size)
        if owner == rank:
            out.setdefault(layer, []).append(local)
    return out


def kv_heads_per_rank(shape: ModelShape, tp_size: int) -> int:
    """KV heads each rank stores (one, replicated, once tp exceeds the KV heads)."""
    return max(1, shape.num_kv_heads // tp_size)


# --- bytes ---

def checkpoint_dtype(hf_config) -> str:
    """The dtype a checkpoint is stored in (what ``dtype="auto"`` loads), e.g. ``"bfloat16"``."""
    return str(getattr(hf_config, "dtype", None) or "bfloat16").removeprefix("torch.")


def dtype_bytes(dtype: str, hf_config) -> int:
    """Bytes per value of the engine's ``dtype`` (``"auto"``: the checkpoint's)."""
    return DTYPE_BYTES.get(dtype if dtype != "auto" else checkpoint_dtype(hf_config), 2)


def kv_bytes_per_token(shape: ModelShape, tp_size: int, value_bytes: int) -> int:
    """KV cache bytes one token takes on one rank: K and V in every layer, for that rank's KV heads."""
    return 2 * shape.num_layers * kv_heads_per_rank(shape, tp_size) * shape.head_dim * value_bytes


def kv_bytes_for_one_request(shape: ModelShape, tp_size: int, value_bytes: int, max_model_len: int) -> int:
    """What vLLM needs to admit one ``max_model_len`` request: whole blocks, plus the block it keeps back."""
    blocks = math.ceil(max_model_len / KV_BLOCK_TOKENS) + 1
    return blocks * KV_BLOCK_TOKENS * kv_bytes_per_token(shape, tp_size, value_bytes)


def parameter_count(config: Any) -> int:
    """Parameters of a decoder-only model estimated from its (text) config: exact for Llama, Mistral,
    Qwen2/3 and Olmo2/3 layouts (gated MLP, q/k norms where the family has them), close for others."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter, vocab = config.intermediate_size, config.vocab_size
    q, k = heads * head_dim, kv * head_dim
    attention = hidden * q + 2 * hidden * k + q * hidden
    family = getattr(config, "model_type", "")
    if getattr(config, "attention_bias", False):
        attention += q + 2 * k + hidden
    elif family == "qwen2":  # Qwen2 always has q/k/v biases and no flag for them
        attention += q + 2 * k
    mlp = 3 * hidden * inter + (2 * inter + hidden if getattr(config, "mlp_bias", False) else 0)
    norms = 2 * hidden
    if family == "qwen3":  # per-head q/k RMSNorm
        norms += 2 * head_dim
    elif family in ("olmo2", "olmo3"):  # q/k RMSNorm over the whole projection
        norms += q + k
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * (attention + mlp + norms) + embeddings + hidden


# --- what the engine refuses ---

def check_context(config: Any, shape: ModelShape) -> None:
    """Refuse a ``config.max_model_len`` longer than the model's context."""
    limit = shape.max_position_embeddings
    if limit and config.max_model_len > limit:
        raise RetmaskError(f"max_model_len={config.max_model_len} exceeds the model's context of {limit} tokens; "
                           "lower max_model_len")


def check_kv_memory(config: Any, shape: ModelShape, hf_config, kv_bytes: int) -> None:
    """Refuse a KV cache of ``kv_bytes`` that cannot hold one ``config.max_model_len`` request."""
    value_bytes = dtype_bytes(config.dtype, hf_config)
    needed = kv_bytes_for_one_request(shape, config.tensor_parallel_size, value_bytes, config.max_model_len)
    if kv_bytes < needed:
        raise RetmaskError(
            f"KV cache of {kv_bytes / 2**20:.0f} MiB cannot hold one {config.max_model_len}-token request "
            f"(needs about {needed / 2**20:.0f} MiB); raise kv_cache_memory_bytes or lower max_model_len"
        )
