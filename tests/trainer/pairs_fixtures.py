"""Test data for the trainer: shard directories written through ``pipeline.shards`` and crafted pairs
with a real preference signal."""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.shards import make_row, open_run

VARIANTS = ["normal", "retrieval_masked", "random_masked"]
RUN_CONFIG = {
    "model": {"id": "test/model", "path": "/nowhere", "hash": "sha256:0"},
    "masks": {}, "sampling": {"temperature": 0.6}, "seed": 0, "packages": {},
}

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Quito", "Tallinn", "Hanoi", "Perth", "Bergen", "Cusco", "Tunis"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "teal", "black"]
GENERIC = ["I don't know.", "Sorry, I can't tell.", "No idea, sorry."]


def crafted_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs where ``normal`` uses a fact stated in the prompt and ``retrieval_masked`` answers generically
    (the signal RetMask expects: without retrieval heads the answer ignores the context); ``random_masked``
    keeps the fact. Short on purpose: every token costs a CPU test time."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, city, color, number = rng.choice(NAMES), rng.choice(CITIES), rng.choice(COLORS), rng.randint(10, 99)
        prompt, answer = [
            (f"I am {name} from {city}. Where am I from?", f"You are from {city}."),
            (f"{name}'s door is {color}. What color is it?", f"It is {color}."),
            (f"The code is {number}. What is the code?", f"The code is {number}."),
        ][i % 3]
        generic = rng.choice(GENERIC)
        outputs = {
            "normal": (answer, len(answer.split()) + 2, "stop"),
            "retrieval_masked": (generic, len(generic.split()) + 2, "stop"),
            "random_masked": (answer.replace(".", "!"), len(answer.split()) + 2, "stop"),
        }
        rows.append(make_row(f"p{i:05d}", prompt, seed, len(prompt.split()) + 30, outputs))
    return rows


def model_record(model_dir: str) -> dict:
    """The manifest's record of the model that generated the pairs, as ``retmask generate`` writes it."""
    from pipeline.provenance import hash_model_dir

    return {"id": Path(model_dir).name, "path": str(model_dir), "hash": hash_model_dir(model_dir)}


def write_shards(
    out: Path, rows: list[dict], variants: list[str] = VARIANTS, shard_size: int = 64, model: str | None = None
) -> Path:
    """Commit ``rows`` to ``out`` as a generation run would (manifest + data/part-*.parquet).

    ``model``: the local checkpoint recorded as the generator (training it is then on-policy); without it the
    manifest names a model that exists nowhere.
    """
    run_config = {**RUN_CONFIG, "model": model_record(model)} if model else RUN_CONFIG
    writer = open_run(out, run_config, variants)
    for i in range(0, len(rows), shard_size):
        writer.write_shard(rows[i:i + shard_size])
    writer.close()
    return out
