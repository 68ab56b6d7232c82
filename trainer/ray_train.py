"""The DPO run on a Ray cluster: ``ray.train.torch.TorchTrainer`` runs ``trainer.dpo.train`` on N workers.

Each worker is one data-parallel rank (gloo on CPU, NCCL on GPU); Ray sets ``RANK``/``WORLD_SIZE``, so
gradient accumulation keeps ``pairs_per_step`` pairs per optimizer step. Rank 0 reports the final model
as a Ray checkpoint, persisted under ``storage_path`` (default ``<output_dir>/ray``; an ``s3://`` URI on a
multi-node cluster). Resuming from ``checkpoint-*`` needs ``output_dir`` on storage every node shares.
The command is ``retmask train --workers N`` (``jobs/train.py``), e.g. as a Ray job next to generation::

    ray job submit --working-dir . -- python -m jobs.train --workers 4 --gpu \\
        --config jobs/configs/train_paper.yaml --pairs /shared/pairs --out /shared/dpo
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from retrieval_heads.config import from_mapping
from retrieval_heads.errors import RetmaskError
from trainer.config import TrainConfig

log = logging.getLogger(__name__)


def train_on_ray(
    config: TrainConfig,
    num_workers: int = 2,
    *,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    storage_path: str | None = None,
) -> str:
    """Run ``config`` on ``num_workers`` Ray workers; returns the path (or URI) of the reported final model."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = _absolute_paths(config)  # workers may start in another working directory
    out = Path(config.output_dir)
    config.grad_accumulation(num_workers)  # fail here, not on every worker
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config.to_dict()},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=out.name, storage_path=storage_path or str(out / "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RetmaskError(f"the Ray run for {out} reported no checkpoint; see its logs under {result.path}")
    log.info("final model reported at %s (metrics %s)", result.checkpoint.path, result.metrics)
    return result.checkpoint.path


def _worker_loop(loop_config: dict) -> None:
    import ray.train

    from trainer.dpo import train

    config = from_mapping(TrainConfig, loop_config["config"], "config")
    final = train(config)
    rank = ray.train.get_context().get_world_rank()
    metrics, checkpoint = {}, None
    if rank == 0:
        saved = json.loads((Path(config.output_dir) / "metrics.json").read_text())
        metrics = {"global_step": saved["global_step"],
                   **{f"eval_end/{k}": v for k, v in (saved["eval_end"] or {}).items()}}
        checkpoint = ray.train.Checkpoint.from_directory(str(final))
    ray.train.report(metrics, checkpoint=checkpoint)  # every rank: report is a barrier


def _absolute_paths(config: TrainConfig) -> TrainConfig:
    def absolute(p: str) -> str:
        return p if "://" in p or not p else str(Path(p).expanduser().resolve())

    model = absolute(config.model) if Path(config.model).expanduser().exists() else config.model
    return dataclasses.replace(config, pairs=absolute(config.pairs), output_dir=absolute(config.output_dir),
                               model=model)

