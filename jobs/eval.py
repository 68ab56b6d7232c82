"""Evaluation recipe: the synthetic long-context suite on several checkpoints, paired against the first.

    retmask eval --models base=smollm2-135m-instruct,trained=runs/train/final --out runs/eval

Writes results.json, results.md, samples.jsonl, scores_by_length.png and overall.png under the output
directory (``pipeline.evaluation.report``), and each checkpoint's answers under ``answers/`` as soon as it
finishes: rerun the same command after an interruption and the finished checkpoints are not answered again.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.report import summary, write_results
from pipeline.evaluation.run import build_plan, evaluate

log = logging.getLogger(__name__)


def run(config: EvalConfig, out: str | Path) -> Path:
    """Build the suite, answer it with every checkpoint, write the outputs; returns ``results.json``'s path."""
    plan = build_plan(config)  # checkpoints resolved, suite built and measured in the baseline's tokens
    results = evaluate(config, plan, Path(out) / "answers")  # one engine per checkpoint, then paired statistics
    path = write_results(results, plan.samples, Path(out))
    for line in summary(results):
        log.info("%s", line)
    return path


if __name__ == "__main__":
    from jobs.cli import main

    main(["eval", *sys.argv[1:]])
