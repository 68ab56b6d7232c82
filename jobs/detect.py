"""Detection recipe: score every head with Wu et al.'s retrieval score, in this process or fanned out on Ray.

    retmask detect --model meta-llama/Llama-3.1-8B-Instruct --lengths 1000,2000,3000,4000,5000 --needles 3 \\
        --workers 8 --gpus-per-worker 1 --dtype bfloat16 --device cuda --out /shared/detect/llama31
    ray job submit --working-dir . -- python -m jobs.detect ...   # the same options, as a Ray job

Trials are independent, so ``workers > 1`` splits the grid into chunks scored as Ray tasks (one model copy
per worker) and merges them in grid order: the outputs are identical to a single-process run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from retrieval_heads.detect import DetectConfig, run_trials, write_outputs
from retrieval_heads.scores import HeadScores


def run(config: DetectConfig, out_dir: str | Path) -> HeadScores:
    """Run the grid (on ``config.workers`` Ray workers when > 1); write the scores and their records."""
    trials = config.grid.trials()
    if config.workers <= 1:
        records, shape = run_trials(config)
    else:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        chunks = [trials[i :: config.workers] for i in range(config.workers) if trials[i :: config.workers]]
        task = ray.remote(num_gpus=config.gpus_per_worker, num_cpus=config.cpus_per_worker)(run_trials)
        results = ray.get([task.remote(config, chunk, False) for chunk in chunks])
        by_trial = {}
        for chunk, (chunk_records, shape) in zip(chunks, results):
            by_trial.update(zip(chunk, chunk_records))
        records = [by_trial[t] for t in trials]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_outputs(config, records, shape.num_layers, shape.num_heads, out)


if __name__ == "__main__":
    from jobs.cli import main

    main(["detect", *sys.argv[1:]])
