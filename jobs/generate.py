"""Ray job: generate the preference shards described by a YAML config.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.generate --config jobs/configs/generate_llama31_8b.yaml --out s3://bucket/retmask/llama31

Inside a job Ray is already there ($RAY_ADDRESS): the driver joins it and places one actor per engine on
the cluster's GPUs. Run without a cluster, it starts Ray on this machine. Rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.generate import GenerateConfig, generate
from retrieval_heads.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML of GenerateConfig fields")
    parser.add_argument("--out", help="output directory or URI (overrides the config)")
    parser.add_argument("--scores", help="head score file (overrides the config)")
    parser.add_argument("--prompts", help="prompt file or directory (overrides the config)")
    parser.add_argument("--num-prompts", type=int, help="use the first N valid prompts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config = GenerateConfig.from_yaml(args.config, out=args.out, scores=args.scores, prompts=args.prompts,
                                      max_prompts=args.num_prompts)
    summary = generate(config)
    print(json.dumps(summary))  # one line: the last line of the job log
    return 0


if __name__ == "__main__":
    run_cli(main)
