"""Serving recipe: vLLM's OpenAI-compatible server on one gated engine, the plain model and each head mask by name.

    retmask serve --scores runs/detect/head_scores.json --port 8000
    python -m jobs.serve --config jobs/configs/serve.yaml

A client picks a mask per request (``extra_body={"vllm_xargs": {"retmask_mask": "retrieval_masked"}}``, or the
model ``<served-name>:retrieval_masked``); see ``pipeline/serve.py``.
"""

from __future__ import annotations

import signal
import sys

from pipeline.serve import ServeConfig, serve
from retrieval_heads.errors import EXIT_INTERRUPTED, EXIT_TERMINATED


def run(config: ServeConfig) -> int:
    """Serve until stopped; the run contract's exit code for the signal that stopped the server."""
    signum = serve(config, ready=lambda text: print(text, flush=True))
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


if __name__ == "__main__":
    from jobs.cli import main

    main(["serve", *sys.argv[1:]])
