"""DPO on RetMask pairs with TRL's ``DPOTrainer``: ``train(config) -> final model directory``.

Output directory (``config.output_dir``)::

    checkpoint-<step>/    resume points (rerunning the same command resumes from the last one)
    final/                model (or LoRA adapter) + tokenizer, loadable with ``from_pretrained``
    train_config.yaml     the resolved config, world size and accumulation steps
    data_stats.json       pair filter counts, split sizes, pairs longer than max_length
    metrics.json          train loss / reward margin / reward accuracy per step; held-out eval at step 0 and end
    curves.png            those curves

Provenance: RetMask's DPO is on-policy (the pairs are the policy's own samples, with and without its
retrieval heads), so ``train`` refuses pairs whose manifest names other weights than ``--model`` unless
``allow_off_policy`` is set. ``train_config.yaml`` records the pairs' digest (``trainer.data.pairs_digest``)
and both models' ids and hashes; a rerun resumes only on the same pairs and the same policy weights.

At step 0 the policy is the reference, so the held-out DPO loss is ln 2 and reward accuracy is 0 (TRL
counts the ties as wrong); both move once training starts. A LoRA run saves the adapter in ``final/``
(``from_pretrained`` loads it with its base model when peft is installed).

The command is ``retmask train`` (``jobs/train.py``): ``retmask train --pairs DIR --preset demo`` in one
process. Several GPUs on one node, with the shipped DeepSpeed configs (ZeRO-1 as RetMask used for
Llama/Olmo, ZeRO-2 for Qwen; needs ``pip install deepspeed``, unverified here)::

    accelerate launch --config_file jobs/configs/accelerate/zero1.yaml --num_processes 4 \\
        -m jobs.train --config jobs/configs/train_paper.yaml --pairs runs/llama/pairs --out runs/llama/dpo

Gradient accumulation follows the world size, so 512 pairs per optimizer step holds on 1, 4 or 8 GPUs.
On a Ray cluster, next to generation, ``retmask train --workers N`` runs it on Ray Train
(``trainer.ray_train``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from pipeline.shards import read_manifest
from retrieval_heads.errors import RetmaskError
from retrieval_heads.files import write_text_atomically
from trainer.config import TrainConfig
from trainer.data import load_pairs

log = logging.getLogger(__name__)

# What makes a rerun the same run: resuming may change steps, logging or batch layout, never these.
IDENTITY_FIELDS = ("pairs", "model", "chosen", "rejected", "lora", "loss_type", "beta", "seed")
CURVES = ("loss", "rewards/margins", "rewards/accuracies")


def world_size() -> int:
    """Processes in this run, as the launcher (accelerate, torchrun, Ray Train) announces it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` directory with the highest step, if any.

    transformers writes ``trainer_state.json`` last, so a checkpoint without it is a save that was killed.
    """
    steps = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    complete = [(step, p) for step, p in steps if (p / "trainer_state.json").is_file()]
    return max(complete)[1] if complete else None


def _remove_incomplete_checkpoints(output_dir: Path) -> None:
    # left in place, checkpoint rotation would count them as the newest and delete good ones
    for p in output_dir.glob("checkpoint-*"):
        if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name) and not (p / "trainer_state.json").is_file():
            log.warning("removing %s: no trainer_state.json, its save was interrupted", p)
            shutil.rmtree(p)


def train(config: TrainConfig, callbacks: list | None = None) -> Path:
    """Train (or resume) one DPO run; returns the directory of the final model.

    ``callbacks`` are ``transformers.TrainerCallback`` instances (timing, reporting) handed to the trainer.
    """
    from retrieval_heads.models import resolve_model

    if not config.pairs:
        raise RetmaskError("no pair directory given; pass --pairs DIR (the output of `retmask generate`)")
    out = Path(config.output_dir)
    world = world_size()
    resume = last_checkpoint(out)
    if resume is not None:
        _check_same_run(out, config)
        log.info("resuming %s from %s", out, resume.name)
    model_path = resolve_model(config.model)
    provenance = check_policy(config, read_manifest(config.pairs), model_path)  # before any data or weights load
    pairs = load_pairs(
        config.pairs, config.chosen, config.rejected, drop_truncated=config.drop_truncated,
        max_response_tokens=config.max_response_tokens, eval_fraction=config.eval_fraction,
        max_length=config.max_length,
    )
    if resume is not None:
        _check_same_inputs(out, config, pairs.stats, provenance)
    if pairs.stats.get("over_max_length"):
        log.warning("%d of %d pairs exceed max_length %d tokens; TRL truncates their responses at the end",
                    pairs.stats["over_max_length"], pairs.stats["pairs"], config.max_length)
    if pairs.stats.get("prompt_over_max_length"):
        log.warning("%d pairs have a prompt of max_length %d tokens or more; TRL drops them",
                    pairs.stats["prompt_over_max_length"], config.max_length)
    args = config.to_dpo_config(world, resuming=resume is not None, evaluate=pairs.eval is not None)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        _remove_incomplete_checkpoints(out)
        resolved = {**config.to_dict(), "model_path": model_path, "world_size": world,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "pairs_digest": pairs.stats["pairs_digest"], "pairs_shards": pairs.stats["shards"],
                    "pairs_rows": pairs.stats["rows"], "provenance": provenance}
        write_text_atomically(out / "train_config.yaml", _yaml(resolved))
        write_text_atomically(out / "data_stats.json", json.dumps(pairs.stats, indent=2) + "\n")

    trainer = _make_trainer(config, args, model_path, pairs, callbacks)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_end = trainer.evaluate() if pairs.eval is not None else {}
    final = out / "final"
    trainer.save_model(str(final))  # every rank: DeepSpeed gathers the weights collectively
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(final))
        metrics = _metrics(trainer.state.log_history, eval_end, pairs.stats, resume)
        write_text_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        plot_curves(metrics, out / "curves.png")
        log.info("final model in %s; eval %s -> %s", final, metrics["eval_start"], metrics["eval_end"])
    return final


def _make_trainer(config: TrainConfig, args, model_path: str, pairs, callbacks: list | None):
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
    # A path (not a loaded model) lets TRL build the frozen reference from the same checkpoint and place
    # both models correctly under DeepSpeed.
    return DPOTrainer(model=model_path, args=args, train_dataset=pairs.train, eval_dataset=pairs.eval,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def check_policy(config: TrainConfig, manifest: dict, model_path: str) -> dict:
    """Refuse pairs generated by other weights than the policy's unless ``allow_off_policy``; the provenance record.

    A local policy is compared by content hash with the manifest's ``run_config.model.hash``; a hub id (weights
    not on this machine yet) by id only.
    """
    from pipeline.provenance import hash_model_dir

    made_by = (manifest.get("run_config") or {}).get("model") or {}
    pairs_id, pairs_hash = made_by.get("id"), made_by.get("hash")
    record = {"pairs_model": {"id": pairs_id, "hash": pairs_hash}, "policy": {"id": config.model, "hash": None},
              "off_policy": False}
    if Path(model_path).is_dir():
        own = record["policy"]["hash"] = hash_model_dir(model_path)
        same = pairs_hash is not None and pairs_hash == own
        ours, theirs = f"{config.model} ({_short(own)})", f"{pairs_id} ({_short(pairs_hash)})"
    else:
        log.info("policy %s is a hub id: its weights are not hashed here, only its id is compared with the pairs'",
                 model_path)
        same = pairs_id == model_path
        ours, theirs = f"hub model {model_path}", f"{pairs_id}"
    if same:
        return record
    if not config.allow_off_policy:
        raise RetmaskError(
            f"the pairs in {config.pairs} were generated by {theirs} but the policy is {ours}; DPO here trains a model "
            "on its own samples: train the model that generated them, regenerate them with this one, or set "
            "allow_off_policy (--allow-off-policy, or allow_off_policy: true) to train on another model's pairs"
        )
    log.warning("off-policy run: training %s on pairs generated by %s (allow_off_policy)", ours, theirs)
    record["off_policy"] = True
    return record


def _short(digest: str | None) -> str:
    return "no hash recorded" if not digest else digest if len(digest) <= 23 else digest[:23] + "..."


def _check_same_inputs(out: Path, config: TrainConfig, stats: dict, provenance: dict) -> None:
    """On resume: the pairs' content and the policy's weights must be those the checkpoints were trained from."""
    saved = _saved_config(out)
    then, now = saved.get("pairs_digest"), stats["pairs_digest"]
    if then is not None and then != now:
        counts_then, counts_now = (saved.get("pairs_shards"), saved.get("pairs_rows")), (stats["shards"], stats["rows"])
        what = (f"{counts_then[0]} shards / {counts_then[1]} rows then, {counts_now[0]} / {counts_now[1]} now"
                if counts_then != counts_now else "the same number of shards and rows with different contents")
        raise RetmaskError(
            f"{out} was trained on other pairs than {config.pairs} holds now ({what}; digest {_short(then)} then, "
            f"{_short(now)} now); use a new --out to train on these pairs, or restore the pairs to resume"
        )
    hash_then = ((saved.get("provenance") or {}).get("policy") or {}).get("hash")
    hash_now = provenance["policy"]["hash"]
    if hash_then and hash_now and hash_then != hash_now:  # the reference model is reloaded from these weights
        raise RetmaskError(
            f"{out} was trained from policy weights {_short(hash_then)}, but {config.model} is {_short(hash_now)} now; "
            "use a new --out to train these weights, or restore the checkpoint to resume"
        )


def _saved_config(out: Path) -> dict:
    saved_path = out / "train_config.yaml"
    if not saved_path.is_file():
        return {}
    import yaml

    return yaml.safe_load(saved_path.read_text()) or {}


def _check_same_run(out: Path, config: TrainConfig) -> None:
    saved = _saved_config(out)
    now = config.to_dict()
    for key in IDENTITY_FIELDS:
        if key == "pairs" and "pairs_digest" in saved:
            continue  # the pairs' content identity is checked once they are read (a moved directory may resume)
        if key in saved and saved[key] != now[key]:
            raise RetmaskError(
                f"{out} holds a run with {key}={saved[key]!r}, this one has {now[key]!r}; "
                "use a new --out to start a different run (or the same value to resume)"
            )


def _metrics(history: list[dict], eval_end: dict, stats: dict, resume: Path | None) -> dict:
    train = [{"step": h["step"], **{k: h[k] for k in ("loss", *CURVES[1:], "rewards/chosen", "rewards/rejected",
                                                      "learning_rate", "grad_norm") if k in h}}
             for h in history if "loss" in h and "eval_loss" not in h]
    evals = [h for h in history if "eval_loss" in h]
    start = next((h for h in evals if h["step"] == 0), None)

    def strip(h: dict | None) -> dict | None:
        if not h:
            return None
        return {k.removeprefix("eval_"): v for k, v in h.items()
                if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
                         "eval_rewards/rejected", "step")}

    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    return {
        "train": train,
        "eval": [strip(h) for h in evals],
        "eval_start": strip(start),
        "eval_end": strip(eval_end) if eval_end else None,
        "global_step": history[-1]["step"] if history else 0,
        "resumed_from": resume.name if resume else None,
        "train_runtime_s": summary.get("train_runtime"),
        "data": stats,
    }


def plot_curves(metrics: dict, path: Path) -> None:
    """Loss, reward margin and reward accuracy over optimizer steps (train lines, held-out eval dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, CURVES):
        pts = [(r["step"], r[key]) for r in metrics["train"] if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1.2, label="train")
        evals = [(e["step"], e[key]) for e in metrics["eval"] if e and key in e]
        if evals:
            ax.plot(*zip(*evals), "o--", color="C3", label="held-out")
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
