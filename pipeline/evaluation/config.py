"""``EvalConfig``: which checkpoints, which suite, which engine; and the ``name=path,...`` form of ``models``."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine import EngineConfig
from pipeline.evaluation.fitting import DEFAULT_LENGTHS, SAMPLES_PER_CELL
from pipeline.evaluation.tasks import TASKS
from retrieval_heads.config import opt
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS


@dataclass
class EvalConfig:
    """What to evaluate and how; ``models`` maps a display name to an alias/path, the first is the baseline."""

    models: dict[str, str] = opt({"base": EMBEDDED_ALIAS}, "name -> alias, checkpoint dir or hub id; first = baseline")
    tasks: tuple[str, ...] = opt(tuple(TASKS), "eval task names, registered in pipeline.evaluation.tasks")
    lengths: tuple[int, ...] = opt(DEFAULT_LENGTHS, "prompt lengths in tokens of the baseline's tokenizer")
    cells: list[str] | None = opt(None, "explicit task@length cells (e.g. niah_multikey@2000), in this order, "
                                  "instead of the tasks x lengths grid; None = the grid")
    samples_per_cell: int = opt(SAMPLES_PER_CELL, "samples per task x length; 20 resolves a 5-point paired change "
                                "(pipeline.evaluation.statistics)")
    seed: int = opt(0, "suite seed: same seed, same samples")
    max_tokens: int | None = opt(None, "answer budget for every task; None = each task's own (32-64)")
    bootstrap: int = opt(2000, "bootstrap replicates for the 95% intervals")
    perplexity: bool = opt(True, "held-out chat perplexity as a general-quality guard")
    engine: EngineConfig = opt(EngineConfig, "engine template; model and max_model_len are set per checkpoint")

    @classmethod
    def demo(cls, models: dict[str, str], **overrides) -> "EvalConfig":
        """CPU-sized: every task once per 1K cell x 3 samples (21 per checkpoint). Shows the machinery and
        large effects only: its paired 95% half-width is ~20 points, not the default suite's <= 5."""
        return cls(models=models, **{"lengths": (1000,), "samples_per_cell": 3, "bootstrap": 1000, **overrides})


def parse_models(text: str) -> dict[str, str]:
    """``name=path,name=path`` -> ordered dict (the first is the baseline)."""
    models: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RetmaskError(f"--models entry {item!r} is not name=path; "
                               "e.g. --models base=smollm2-135m-instruct,trained=runs/train/final")
        if name in models:
            raise RetmaskError(f"--models names {name!r} twice; give every checkpoint its own name")
        models[name] = path
    return models
