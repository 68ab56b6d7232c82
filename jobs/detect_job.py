"""Ray job: fan detection trials out over workers (one model copy per worker) and merge the records.

    ray job submit --working-dir . -- python -m jobs.detect_job --model meta-llama/Llama-3.1-8B-Instruct \\
        --lengths 1000,2000,3000,4000,5000 --needles 3 --workers 8 --gpus-per-worker 1 --dtype bfloat16 \\
        --device cuda --out /shared/detect/llama31

Locally (no cluster) it starts Ray on this machine. The merged outputs are identical to `retmask detect`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval_heads.detect import DetectConfig, run_trials, write_outputs
from retrieval_heads.errors import run_cli


def detect_distributed(config: DetectConfig, out_dir: str | Path, workers: int = 2, gpus_per_worker: float = 0,
                       cpus_per_worker: float = 1) -> "HeadScores":  # noqa: F821
    """Split the grid into ``workers`` chunks, score each as a Ray task, merge in grid order."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    trials = config.grid.trials()
    chunks = [trials[i::workers] for i in range(workers) if trials[i::workers]]
    task = ray.remote(num_gpus=gpus_per_worker, num_cpus=cpus_per_worker)(run_trials)
    results = ray.get([task.remote(config, chunk, False) for chunk in chunks])
    by_trial = {}
    for chunk, (records, shape) in zip(chunks, results):
        by_trial.update(zip(chunk, records))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_outputs(config, [by_trial[t] for t in trials], shape.num_layers, shape.num_heads, out)


def _numbers(kind: type):
    """argparse type for ``1000,2000``: a bad list is a usage error (exit 2), not a traceback."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DetectConfig.model)
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="500,1000,2000,4000", type=_numbers(int))
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", type=_numbers(float))
    parser.add_argument("--needles", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    args = parser.parse_args()
    config = DetectConfig(model=args.model, lengths=args.lengths, depths=args.depths, num_needles=args.needles,
                          dtype=args.dtype, device=args.device)
    scores = detect_distributed(config, args.out, args.workers, args.gpus_per_worker, args.cpus_per_worker)
    print(f"{scores.num_trials()} counted trials; top: {scores.ranked()[:5]}")


if __name__ == "__main__":
    run_cli(main)
