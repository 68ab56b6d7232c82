"""``TrainConfig``: every choice of a DPO run, with the RetMask recipe (``paper``) and a CPU demo preset.

YAML files in ``jobs/configs/train_*.yaml`` map 1:1 onto the fields; keyword overrides (CLI flags) win
over the YAML, which wins over the preset it names.

Truncation (PAPER_NOTES pitfall 7): TRL 1.16 has no ``max_prompt_length``; ``max_length`` caps
prompt+response *per sequence* and keeps the start (``truncation_mode="keep_start"``), so the end of a long
response is cut silently, and pairs whose prompt alone fills ``max_length`` are dropped. The trainer
reports how many pairs exceed ``max_length`` (``data_stats.json``: ``over_max_length``) from the token
counts generation recorded; set ``max_response_tokens`` to drop long pairs instead of truncating them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retrieval_heads.errors import RetmaskError


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """A DPO run. Defaults are the RetMask recipe (PAPER_NOTES section 4)."""

    # what to train on
    pairs: str = _f("", "shard directory from `retmask generate` (manifest.json + data/*.parquet)")
    model: str = _f("smollm2-135m-instruct", "alias, local checkpoint directory or hub id of the policy")
    output_dir: str = _f("runs/train", "checkpoints, final model, metrics.json, curves.png; rerun to resume")
    preset: str = _f("paper", "the preset the other values started from (recorded, not applied again)")
    chosen: str = _f("normal", "variant whose responses are preferred")
    rejected: str = _f("retrieval_masked", "variant whose responses are dispreferred (e.g. random_masked as control)")
    # pair filters
    drop_truncated: bool = _f(True, "drop pairs where either side stopped at the generation token limit")
    max_response_tokens: int | None = _f(None, "drop pairs where either response is longer (tokens); None keeps all")
    eval_fraction: float = _f(0.02, "share of prompts held out for eval, by prompt-id hash (0 disables eval)")
    # model
    dtype: str = _f("float32", "dtype the policy is loaded in; float32 keeps master weights, since a 5e-7 step "
                    "vanishes in bf16 weights (DeepSpeed bf16 keeps its own fp32 master copy)")
    bf16: bool = _f(True, "bf16 mixed precision (autocast, or DeepSpeed bf16 under accelerate)")
    gradient_checkpointing: bool = _f(True, "recompute activations in backward: less memory, ~20-30% slower")
    lora: bool = _f(False, "train a LoRA adapter (peft) instead of all weights; the reference is the adapter-off model")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters (never lm_head: TRL reads lm_head.weight directly)",
    )
    # optimization
    learning_rate: float = _f(5e-7, "peak learning rate (AdamW)")
    lr_scheduler_type: str = _f("cosine_with_min_lr", "transformers scheduler name")
    min_lr: float | None = _f(5e-8, "final learning rate of cosine_with_min_lr (ignored by other schedulers)")
    warmup_ratio: float = _f(0.1, "share of optimizer steps with linear warmup, in [0, 1)")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (transformers default; the paper leaves it unset)")
    num_train_epochs: float = _f(2.0, "passes over the train split")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run the epochs)")
    pairs_per_step: int = _f(512, "pairs per optimizer step = per_device_batch_size x grad accumulation x world size")
    per_device_batch_size: int = _f(2, "pairs per forward pass on each process")
    eval_batch_size: int | None = _f(None, "pairs per eval forward pass (None: per_device_batch_size)")
    # DPO
    beta: float = _f(0.1, "DPO beta: strength of the KL anchor to the reference")
    loss_type: str = _f("sigmoid", "TRL DPO loss (sigmoid = the original DPO loss)")
    max_length: int | None = _f(1024, "prompt+response tokens per sequence; longer ones lose their end (see module doc)")
    precompute_ref_log_probs: bool = _f(False, "score the reference once before training and drop it from memory")
    precompute_ref_batch_size: int | None = _f(None, "pairs per reference forward when precomputing (None: train batch)")
    # bookkeeping
    seed: int = _f(42, "seed for init, data order and dropout")
    logging_steps: int = _f(1, "optimizer steps between train-metric logs")
    save_steps: int = _f(50, "optimizer steps between checkpoints (the resume points)")
    save_total_limit: int | None = _f(2, "checkpoints kept on disk (oldest deleted first)")
    eval_steps: int | None = _f(None, "optimizer steps between held-out evals (None: only at step 0 and the end)")
    report_to: str = _f("none", "transformers integrations to log to (none, tensorboard, wandb, ...)")
    dataloader_num_workers: int = _f(0, "dataloader worker processes")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RetmaskError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.pairs_per_step < 1 or self.per_device_batch_size < 1:
            raise RetmaskError("pairs_per_step and per_device_batch_size must be positive")
        if self.lr_scheduler_type == "cosine_with_min_lr" and self.min_lr is None:
            raise RetmaskError("lr_scheduler_type cosine_with_min_lr needs min_lr; set it or pick another scheduler")

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """A preset (``paper`` or ``demo``) with keyword overrides; overrides set to None are ignored."""
        if name not in PRESETS:
            raise RetmaskError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls._build({**PRESETS[name], "preset": name}, {k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Fields from a YAML file (starting from its ``preset``), then keyword overrides (None ignored)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise RetmaskError(f"cannot read train config {path} ({err})") from None
        if not isinstance(data, dict):
            raise RetmaskError(f"{path} must hold a mapping of TrainConfig fields")
        preset = overrides.get("preset") or data.get("preset", "paper")
        if preset not in PRESETS:
            raise RetmaskError(f"{path}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        cls._check_keys(data, str(path))
        base = {**PRESETS[preset], **data, "preset": preset}
        return cls._build(base, {k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Rebuild a config from ``to_dict()`` (e.g. inside a Ray worker)."""
        cls._check_keys(data, "config")
        return cls(**data)

    @classmethod
    def _build(cls, base: dict, overrides: dict) -> "TrainConfig":
        cls._check_keys(overrides, "overrides")
        return cls(**{**base, **overrides})

    @staticmethod
    def _check_keys(data: dict, where: str) -> None:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RetmaskError(f"{where}: unknown TrainConfig field(s) {unknown}; valid fields: {sorted(names)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def grad_accumulation(self, world_size: int) -> int:
        """Accumulation steps that make ``pairs_per_step`` pairs per optimizer step on ``world_size`` processes."""
        per_pass = self.per_device_batch_size * world_size
        if self.pairs_per_step % per_pass:
            raise RetmaskError(
                f"pairs_per_step {self.pairs_per_step} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x {world_size} process(es); change per_device_batch_size or pairs_per_step"
            )
        return self.pairs_per_step // per_pass

    def to_dpo_config(self, world_size: int = 1, *, resuming: bool = False, evaluate: bool = True):
        """TRL ``DPOConfig`` for this run on ``world_size`` processes (eval at step 0 unless resuming)."""
        import torch
        from trl import DPOConfig

        scheduler_kwargs = {"min_lr": self.min_lr} if self.lr_scheduler_type == "cosine_with_min_lr" else None
        return DPOConfig(
            output_dir=self.output_dir,
            model_init_kwargs={"dtype": self.dtype},
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type,
            lr_scheduler_kwargs=scheduler_kwargs,
            # transformers 5 dropped warmup_ratio: a float in [0, 1) given as warmup_steps is a ratio
            warmup_steps=self.warmup_ratio,
            weight_decay=self.weight_decay,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            max_grad_norm=self.max_grad_norm,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_batch_size,
            per_device_eval_batch_size=self.eval_batch_size or self.per_device_batch_size,
            gradient_accumulation_steps=self.grad_accumulation(world_size),
            beta=self.beta,
            loss_type=[self.loss_type],
            max_length=self.max_length,
            precompute_ref_log_probs=self.precompute_ref_log_probs,
            precompute_ref_batch_size=self.precompute_ref_batch_size,
            bf16=self.bf16,
            gradient_checkpointing=self.gradient_checkpointing,
            seed=self.seed,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            eval_strategy="steps" if evaluate and self.eval_steps else "no",
            eval_steps=self.eval_steps,
            eval_on_start=evaluate and not resuming,  # inside the train loop, so DeepSpeed has wrapped the model
            report_to=self.report_to,
            dataloader_num_workers=self.dataloader_num_workers,
            disable_tqdm=False,
            # without it transformers refuses bf16 on a CPU-only machine; with it, bf16 means CPU autocast
            use_cpu=not torch.accelerator.is_available(),
        )


# The paper preset states the recipe in full, so the file reads as the recipe. demo is sized for the embedded
# 135M model on a few CPU cores: a 20x higher learning rate than the paper (few steps must move the policy),
# fp32 (bf16 autocast is ~2x faster only on CPUs with native bf16, e.g. avx512_bf16, and far slower
# elsewhere: opt in with bf16=true), no checkpointing, 2 pairs per forward pass (8 at once peak at ~10 GB of
# logits and their gradients for the 49k-token vocabulary; 2 keep the run under 6 GB at the same speed).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        learning_rate=5e-7, lr_scheduler_type="cosine_with_min_lr", min_lr=5e-8, warmup_ratio=0.1,
        weight_decay=0.1, adam_beta2=0.95, num_train_epochs=2.0, pairs_per_step=512, per_device_batch_size=2,
        beta=0.1, loss_type="sigmoid", max_length=1024, dtype="float32", bf16=True, gradient_checkpointing=True,
        eval_fraction=0.02, save_steps=50,
    ),
    "demo": dict(
        learning_rate=1e-5, lr_scheduler_type="cosine_with_min_lr", min_lr=1e-6, warmup_ratio=0.1,
        weight_decay=0.1, adam_beta2=0.95, num_train_epochs=1.0, pairs_per_step=8, per_device_batch_size=2,
        beta=0.1, loss_type="sigmoid", max_length=512, dtype="float32", bf16=False, gradient_checkpointing=False,
        eval_fraction=0.1, save_steps=10,
    ),
}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """YAML reads 5e-7 as a string and CLIs pass strings; convert to the field's type or fail in one line."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise RetmaskError(f"TrainConfig.{name} cannot be null")
    base = next(a for a in args if a is not type(None))
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if base in (int, float):
            if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return base(value)
        if typing.get_origin(base) is list:
            return [str(v) for v in (value.split(",") if isinstance(value, str) else value)]
        return str(value) if base is str else value
    except (TypeError, ValueError):
        raise RetmaskError(f"TrainConfig.{name} must be {getattr(base, '__name__', base)}, got {value!r}") from None
