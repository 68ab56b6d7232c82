"""What the generation tests share: a fixed head score file, prompt files, a CPU-sized config, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

LAYERS, HEADS = 30, 9  # the embedded SmolLM2-135M-Instruct
RETRIEVAL = [(16, 1), (17, 2), (18, 3), (19, 0), (20, 5)]
REPO = Path(__file__).resolve().parents[2]

# Small enough for 2 shared cores: a few prompts, 16 new tokens, a 64 MiB KV cache.
SMALL = {
    "model": "smollm2-135m-instruct",
    "prompts_source": "jsonl",
    "variants": ["normal", "retrieval_masked"],
    "sampling": {"max_tokens": 16},
    "max_model_len": 256,
    "engine": {"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 8},
    "batch_size": 4,
}


def write_scores(path: Path) -> Path:
    """Wu-format scores: five heads at 0.5, every other head 0."""
    path.write_text(json.dumps({f"{l}-{h}": [0.5 if (l, h) in RETRIEVAL else 0.0] for l in range(LAYERS) for h in range(HEADS)}))
    return path


def prompt_rows(n: int, prefix: str = "p") -> list[dict]:
    topics = ["rivers", "bread", "chess", "volcanoes", "owls", "bicycles", "tea", "comets"]
    return [{"id": f"{prefix}{i:02d}", "prompt": f"In two sentences, tell me something about {topics[i % len(topics)]} (#{i})."}
            for i in range(n)]


def write_prompts(path: Path, rows: list, extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({**SMALL, **fields}))
    return path


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join someone else's cluster
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return env


def retmask(*args, timeout: int = 600, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in its own process."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env or child_env(), **popen)


def job_summary(stdout: str) -> dict:
    """The JSON summary ``python -m jobs.generate`` prints last (actor logs may interleave)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and '"rows_written"' in line:
            return json.loads(line)
    raise AssertionError(f"no summary in output:\n{stdout[-3000:]}")


def data_files(out: Path) -> list[str]:
    return sorted(f"data/{p.name}" for p in (out / "data").iterdir())
