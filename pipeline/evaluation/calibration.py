"""The study's pre-registered cell selection: calibrate the suite on the base model, keep the cells with room.

A (task, length) cell that the base model always solves (100 points) or never solves (0) cannot show a
fine-tune's effect in one direction, and a cell near either edge barely can; spending the study's samples
there buys no power. So ``docs/STUDY.md`` (Evaluation) fixes the rule before any result: run the full grid
on the base model once (its own seed, never reused for study samples), then keep the cells whose mean lies
in [10, 90] points; if fewer than 3 do, the cells in (0, 100) exclusive; if still fewer than 3, all cells.
``select_cells`` is that rule and nothing else; ``read_cell_scores`` takes the per-cell means out of the
calibration's ``results.json`` (``pipeline.evaluation.report``); the kept cells go back into the suite as
``EvalConfig.cells`` (``pipeline.evaluation.fitting.format_cell``), whose samples are those the full grid
would hold for the same seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from retrieval_heads.errors import RetmaskError

Cell = tuple[str, int]  # (task, length in tokens)


def select_cells(cell_scores: dict[Cell, float], low: float = 10.0, high: float = 90.0,
                 min_cells: int = 3) -> tuple[list[Cell], str]:
    """The cells kept by the pre-registered rule (in the order of ``cell_scores``) and the branch that applied.

    ``cell_scores`` maps each cell to its calibration mean in points (0-100). Branches, first that keeps at
    least ``min_cells``: ``"in [low, high]"`` (inclusive), ``"in (0, 100)"`` (exclusive), else ``"all"``.
    """
    in_band = [c for c, score in cell_scores.items() if low <= score <= high]
    if len(in_band) >= min_cells:
        return in_band, f"in [{low:g}, {high:g}]"
    not_saturated = [c for c, score in cell_scores.items() if 0 < score < 100]
    if len(not_saturated) >= min_cells:
        return not_saturated, "in (0, 100)"
    return list(cell_scores), "all"


def read_cell_scores(path: str | Path, checkpoint: str | None = None) -> dict[Cell, float]:
    """Per-cell mean scores in points (0-100) of one checkpoint (default: the first, the baseline) in a
    ``results.json`` of ``retmask eval``, in suite order.

    The file stores means as fractions (0-1); ``100 * mean`` is rounded to 9 decimals so that the float
    noise of averaging fractions (0.1 + 0.2 ...) cannot move a cell across a boundary of the rule.
    """
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RetmaskError(f"{path} does not exist; run retmask eval on the base model first") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RetmaskError(f"cannot read {path} ({getattr(err, 'strerror', None) or err})") from None
    except json.JSONDecodeError as err:
        raise RetmaskError(f"{path} is not JSON ({err}); it is not a results.json of retmask eval") from None
    checkpoints = results.get("checkpoints") if isinstance(results, dict) else None
    if not isinstance(checkpoints, dict) or not checkpoints:
        raise RetmaskError(f"{path} has no checkpoints; it is not a results.json of retmask eval")
    name = next(iter(checkpoints)) if checkpoint is None else checkpoint
    if name not in checkpoints:
        raise RetmaskError(f"{path} has no checkpoint {name!r}; it holds {', '.join(checkpoints)}")
    try:
        return {(task, int(length)): round(100 * float(cell["mean"]), 9)
                for task, info in checkpoints[name]["tasks"].items()
                for length, cell in info["by_length"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise RetmaskError(f"{path}: checkpoint {name!r} has no per-cell scores (tasks -> by_length -> mean); "
                           "it is not a results.json of retmask eval") from None
