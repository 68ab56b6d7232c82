"""PNG plots: head-score heatmap and ablation bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from retrieval_heads.scores import HeadScores  # noqa: E402


def head_grid(scores: HeadScores, num_layers: int, num_heads: int) -> np.ndarray:
    """Mean scores as a (layers, heads) array, 0 where a head has no entry."""
    grid = np.zeros((num_layers, num_heads))
    for (layer, head), value in scores.mean().items():
        grid[layer, head] = value
    return grid


def plot_head_heatmap(scores: HeadScores, num_layers: int, num_heads: int, path: str | Path,
                      title: str = "Retrieval scores") -> Path:
    """Layers x heads heatmap of mean retrieval scores."""
    grid = head_grid(scores, num_layers, num_heads)
    fig, ax = plt.subplots(figsize=(max(4, num_heads * 0.5 + 2), max(4, num_layers * 0.22 + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_heads))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="mean retrieval score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_ablation(rows: list[dict], path: str | Path, title: str = "NIAH accuracy under head masking") -> Path:
    """Bar chart of NIAH accuracy per condition (``rows``: {"condition", "accuracy", "stderr"})."""
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows) + 1), 3.5))
    names = [r["condition"] for r in rows]
    values = [r["accuracy"] for r in rows]
    errors = [r.get("stderr", 0.0) for r in rows]
    colors = ["#4c72b0" if "retrieval" not in n else "#c44e52" for n in names]
    ax.bar(names, values, yerr=errors, color=colors, capsize=3)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("NIAH accuracy (ROUGE-1 recall > 0.5)")
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
