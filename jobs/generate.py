"""Generation recipe: the preference shards a ``GenerateConfig`` describes, and its dry run (``plan``).

    retmask generate --config jobs/configs/generate_llama31_8b.yaml --out s3://bucket/retmask/llama31
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.generate --config jobs/configs/generate_llama31_8b.yaml --out s3://bucket/retmask/llama31

Inside a job Ray is already there ($RAY_ADDRESS): the driver joins it and places one actor per engine on
the cluster's GPUs. Run without a cluster, it starts Ray on this machine. Rerun the same command to resume.
``python -m jobs.generate`` is ``retmask generate --json``: the summary is the job log's last line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pipeline.generate import GenerateConfig, generate
from retrieval_heads.config import opt


@dataclass
class PlanTarget:
    """The cluster a plan is checked against (``retmask plan``): a config.json says nothing about GPUs."""

    gpu_memory_gb: float = opt(80.0, "memory of one GPU in GiB (80 for an A100/H100 80GB)")
    gpus_per_node: int = opt(8, "GPUs per cluster node")
    max_rows: int = opt(10_000, "prompt rows scanned; 0 = the whole source")


def run(config: GenerateConfig) -> dict:
    """Generate (or resume) every prompt under every variant; returns the run summary."""
    return generate(config)


def dry_run(config: GenerateConfig, target: PlanTarget):
    """The plan of a run from the model's config.json alone (no weights, no engine, nothing written)."""
    from pipeline.plan import plan

    return plan(config, gpu_memory_gb=target.gpu_memory_gb, gpus_per_node=target.gpus_per_node,
                max_rows=target.max_rows or None)


if __name__ == "__main__":
    from jobs.cli import main

    main(["generate", "--json", *sys.argv[1:]])
