"""HeadMask and RetMask ablation for Hugging Face models: zero a head's input columns of ``o_proj``.

A masked head contributes exactly zero to the residual stream at every position, prefill and decode.
Under GQA only the query head's output is removed; the shared K/V heads are untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from retrieval_heads.config import opt
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS, ModelShape, shape_of
from retrieval_heads.scores import Head, HeadScores, select_heads

# Attention output projections the gate knows, as (attention module attribute, projection attribute).
SUPPORTED_PROJECTIONS = [("self_attn", "o_proj")]
# The families the test suite covers at every stage (tests/families.py). Other decoders whose layers expose
# self_attn.o_proj pass the same checks, but no test keeps them working, so they are not claimed.
SUPPORTED_ARCHITECTURES = "Llama (Llama-3.1, SmolLM2), Qwen3, Olmo-3"


@dataclass(frozen=True)
class HeadMask:
    """A validated set of (layer, query head) to ablate, for a model of a given shape."""

    heads: tuple[Head, ...]
    num_layers: int
    num_heads: int

    def __post_init__(self):
        heads = tuple(sorted(set((int(l), int(h)) for l, h in self.heads)))
        for layer, head in heads:
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
                raise RetmaskError(
                    f"head {layer}-{head} is out of range for a model with {self.num_layers} layers x "
                    f"{self.num_heads} heads (0-indexed); fix the head list or the score file"
                )
        object.__setattr__(self, "heads", heads)

    @classmethod
    def for_shape(cls, heads: Iterable[Head], shape: ModelShape) -> "HeadMask":
        return cls(tuple(heads), shape.num_layers, shape.num_heads)

    @classmethod
    def parse(cls, spec: str, shape: ModelShape) -> "HeadMask":
        """Parse ``"17-3,18-2"`` (layer-head pairs, 0-indexed)."""
        heads = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            parts = item.split("-")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise RetmaskError(f"head {item!r} is not 'layer-head' (e.g. '17-3')")
            heads.append((int(parts[0]), int(parts[1])))
        return cls.for_shape(heads, shape)

    def __len__(self) -> int:
        return len(self.heads)

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, head in self.heads:
            out.setdefault(layer, []).append(head)
        return out

    @property
    def id(self) -> str:
        """Short stable identifier, e.g. ``5h-1a2b3c4d`` (``none`` for the empty mask)."""
        if not self.heads:
            return "none"
        blob = ",".join(f"{l}-{h}" for l, h in self.heads) + f"/{self.num_layers}x{self.num_heads}"
        return f"{len(self.heads)}h-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def spec(self) -> str:
        return ",".join(f"{l}-{h}" for l, h in self.heads)

    def to_dict(self) -> dict:
        return {"id": self.id, "heads": self.spec(), "num_layers": self.num_layers, "num_heads": self.num_heads}


@dataclass
class MaskExportConfig:
    """A static masked checkpoint (``retmask export-masked``); ``jobs/configs/export_masked.yaml`` maps 1:1."""

    scores: str = opt("runs/detect/head_scores.json", "head score file (Wu JSON) detected on this model")
    out: str = opt("runs/masked", "directory for the masked checkpoint")
    model: str = opt(EMBEDDED_ALIAS, "alias, local checkpoint or hub id")
    strategy: str = opt("threshold", "threshold | top_k | random_nonretrieval | random_all")
    threshold: float = opt(0.1, "strategy threshold: heads whose mean score is at least this")
    k: int = opt(5, "strategies top_k and random_*: number of heads")
    seed: int = opt(0, "strategies random_*: the seed of the draw")


def select_mask(scores: HeadScores | str | Path, rule: str, shape: ModelShape, **options) -> HeadMask:
    """The heads ``rule`` picks from a score file (or loaded scores), as a mask checked against ``shape``.

    The one path from "score file" to "mask" that detection checks, generation and export all take, so a
    score file detected on another model (a shape mismatch) is refused the same way everywhere. ``options``
    are the rule's (``threshold``, ``k``, ``seed``, ``exclude``; see ``retrieval_heads.scores.SELECTORS``).
    """
    if not isinstance(scores, HeadScores):
        scores = HeadScores.load(scores)
    scores.check_shape(shape)
    return HeadMask.for_shape(select_heads(scores, rule, **options), shape)


def output_projections(model) -> list:
    """The attention output projection of every decoder layer, in layer order."""
    layers = decoder_layers(model)
    projections = []
    for layer in layers:
        for attn_name, proj_name in SUPPORTED_PROJECTIONS:
            proj = getattr(getattr(layer, attn_name, None), proj_name, None)
            if proj is not None:
                projections.append(proj)
                break
        else:
            raise RetmaskError(
                f"cannot find the attention output projection in {type(layer).__name__}; "
                f"supported: {SUPPORTED_ARCHITECTURES}"
            )
    return projections


def decoder_layers(model):
    """The model's decoder layers, for the layouts of the supported architectures."""
    for path in ("model.layers", "model.model.layers", "layers", "model.decoder.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        else:
            return list(obj)
    raise RetmaskError(f"cannot find decoder layers in {type(model).__name__}; supported: {SUPPORTED_ARCHITECTURES}")


def channel_gate(heads: Iterable[int], num_heads: int, head_dim: int, dtype=None, device=None):
    """A 0/1 vector over ``o_proj`` input channels: 0 on the given heads' ``head_dim`` slices."""
    import torch

    gate = torch.ones(num_heads * head_dim, dtype=dtype, device=device)
    for head in heads:
        gate[head * head_dim : (head + 1) * head_dim] = 0
    return gate


@contextlib.contextmanager
def masked(model, mask: HeadMask) -> Iterator[None]:
    """Reversible runtime gate: inside the block the mask's heads output zero at every position."""
    shape = shape_of(model.config)
    if (shape.num_layers, shape.num_heads) != (mask.num_layers, mask.num_heads):
        raise RetmaskError(
            f"mask is for {mask.num_layers}x{mask.num_heads} heads but the model has "
            f"{shape.num_layers}x{shape.num_heads}"
        )
    projections = output_projections(model)
    handles = []
    try:
        for layer, heads in mask.by_layer().items():
            proj = projections[layer]
            gate = channel_gate(heads, shape.num_heads, shape.head_dim, proj.weight.dtype, proj.weight.device)

            def pre_hook(module, args, gate=gate):
                return (args[0] * gate,) + tuple(args[1:])

            handles.append(proj.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def zero_heads_in_place(model, mask: HeadMask) -> None:
    """Bake the mask into the weights: zero each head's input columns of ``o_proj`` (and nothing else)."""
    import torch

    shape = shape_of(model.config)
    projections = output_projections(model)
    with torch.no_grad():
        for layer, heads in mask.by_layer().items():
            weight = projections[layer].weight
            for head in heads:
                weight[:, head * shape.head_dim : (head + 1) * shape.head_dim] = 0


def export_masked_checkpoint(model_path: str, mask: HeadMask, out_dir: str | Path) -> Path:
    """Save a RetMask-compatible static copy of the model with the mask's heads zeroed."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    zero_heads_in_place(model, mask)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out_dir)
    (out_dir / "retmask_mask.json").write_text(
        json.dumps({"base_model": model_path, **mask.to_dict()}, indent=2) + "\n"
    )
    return out_dir
