"""Training recipe: DPO on preference shards, in this process, under a launcher, or on Ray Train workers.

    retmask train --config jobs/configs/train_demo.yaml --pairs runs/demo/generate --out runs/demo/train
    accelerate launch --config_file jobs/configs/accelerate/zero1.yaml --num_processes 4 \\
        -m jobs.train --config jobs/configs/train_paper.yaml --pairs PAIRS --out OUT
    ray job submit --working-dir . -- python -m jobs.train --workers 4 --gpu \\
        --config jobs/configs/train_paper.yaml --pairs /shared/pairs --out /shared/dpo

``python -m jobs.train`` is ``retmask train``: under ``accelerate launch`` or ``torchrun`` every process
runs it and the launcher's ``WORLD_SIZE`` sets the gradient accumulation. ``--workers N`` instead starts N
data-parallel Ray Train workers (``trainer.ray_train``); resuming then needs ``--out`` on storage every node
shares. Rerun the same command to resume from the last checkpoint.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from retrieval_heads.config import opt
from trainer.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class RayWorkers:
    """Where a run trains: this process (``workers`` 0) or that many Ray Train workers, one rank each."""

    workers: int = opt(0, "Ray Train workers (data-parallel ranks); 0 trains in this process or under a launcher")
    gpu: bool = opt(False, "one GPU per Ray worker (NCCL); without it the workers train on CPU (gloo)")
    cpus_per_worker: int = opt(1, "CPUs reserved for each Ray worker")
    storage_path: str | None = opt(None, "where Ray persists the final checkpoint: a path every node shares or an "
                                   "s3:// URI (None: <out>/ray)")


def run(config: TrainConfig, ray: RayWorkers | None = None) -> str:
    """Train (or resume) one DPO run; returns where the final model is (a directory, or Ray's checkpoint URI)."""
    ray = ray or RayWorkers()
    if ray.workers < 1:
        from trainer.dpo import train

        final = str(train(config))
    else:
        from trainer.ray_train import train_on_ray

        final = train_on_ray(config, ray.workers, use_gpu=ray.gpu, cpus_per_worker=ray.cpus_per_worker,
                             storage_path=ray.storage_path)
    log.info("final model: %s (metrics.json and curves.png in %s)", final, config.output_dir)
    return final


if __name__ == "__main__":
    from jobs.cli import main

    main(["train", *sys.argv[1:]])
