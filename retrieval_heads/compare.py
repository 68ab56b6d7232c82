"""Two head-score files side by side: which heads they agree on, how their rankings correlate, where the mass sits.

Methods disagree (on Llama-3.1-8B-Instruct, QRHead's top 16 shares one head with Wu's top 16), and training can
move heads, so the comparison is over rankings, which every format supports, not over raw values, whose scales
differ between methods: overlap of the top-k sets, Spearman's rho and Kendall's tau-b over all heads (ties get
average ranks; numpy only), each file's share of score mass per layer, and the heads in one top-k only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval_heads.errors import RetmaskError
from retrieval_heads.scores import Head, HeadScores

DEFAULT_KS = (5, 10, 20)
_SHOWN = 8  # heads listed per cell of the printed table (compare.json holds them all)


def compare(a: HeadScores, b: HeadScores, ks: tuple[int, ...] = DEFAULT_KS) -> dict:
    """Overlap@k, rank correlations, score mass per layer and one-sided top-k heads of ``b`` against ``a``."""
    _check_same_heads(a, b)
    heads = a.heads
    n = len(heads)
    ks = _valid_ks(ks, n)
    mean_a, mean_b = a.mean(), b.mean()
    va = np.array([mean_a[h] for h in heads])
    vb = np.array([mean_b[h] for h in heads])
    ranked_a, ranked_b = a.ranked(), b.ranked()
    overlap = []
    for k in ks:
        top_a = [h for h, _ in ranked_a[:k]]
        top_b = [h for h, _ in ranked_b[:k]]
        shared = set(top_a) & set(top_b)
        overlap.append({
            "k": k,
            "shared": len(shared),
            "fraction": len(shared) / k,
            "only_a": [_name(h) for h in top_a if h not in shared],
            "only_b": [_name(h) for h in top_b if h not in shared],
            # a top-k that ends inside a run of equal scores is filled by (layer, head) order, not by score
            "cut_in_tie": {"a": _cut_in_tie(ranked_a, k), "b": _cut_in_tie(ranked_b, k)},
        })
    num_layers, num_heads = _extent(heads)
    return {
        "a": a.source,
        "b": b.source,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_heads_total": n,
        "spearman": _spearman(va, vb),
        "kendall_tau_b": _kendall_tau_b(va, vb),
        "overlap": overlap,
        "layer_mass": {"a": _layer_mass(mean_a, num_layers), "b": _layer_mass(mean_b, num_layers)},
    }


def compare_many(files: list[HeadScores], ks: tuple[int, ...] = DEFAULT_KS) -> dict:
    """Every file after the first against the first (e.g. one method against several, or before/after training)."""
    if len(files) < 2:
        raise RetmaskError(f"compare needs at least two head-score files, got {len(files)}")
    return {"reference": files[0].source, "ks": list(_valid_ks(ks, len(files[0].trials))),
            "comparisons": [compare(files[0], other, ks) for other in files[1:]]}


def _check_same_heads(a: HeadScores, b: HeadScores) -> None:
    if set(a.trials) != set(b.trials):
        raise RetmaskError(
            f"cannot compare {b.source} ({_describe(b)}) with {a.source} ({_describe(a)}); compare files for "
            "models of the same shape"
        )


def _describe(scores: HeadScores) -> str:
    layers, heads = _extent(scores.heads)
    return f"{len(scores.trials)} heads, {layers} layers x {heads} heads"


def _extent(heads: list[Head]) -> tuple[int, int]:
    return 1 + max(l for l, _ in heads), 1 + max(h for _, h in heads)


def _valid_ks(ks: tuple[int, ...], n: int) -> tuple[int, ...]:
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RetmaskError(f"k must be a whole number of at least 1, got {k!r}; e.g. --k 5,10,20")
    kept = tuple(sorted({k for k in ks if k <= n}))
    if not kept:
        raise RetmaskError(f"every k in {list(ks)} exceeds the {n} heads; pick k from 1 to {n}")
    return kept


def _name(head: Head) -> str:
    return f"{head[0]}-{head[1]}"


def _cut_in_tie(ranked: list[tuple[Head, float]], k: int) -> bool:
    return k < len(ranked) and ranked[k - 1][1] == ranked[k][1]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their positions."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho: Pearson correlation of average ranks; None when either file is constant."""
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else None


def _kendall_tau_b(x: np.ndarray, y: np.ndarray, chunk: int = 512) -> float | None:
    """Kendall's tau-b over all pairs, in row chunks so memory stays O(chunk x n); None when a file is constant."""
    n = len(x)
    concordance = ties_x = ties_y = 0.0
    for start in range(0, n, chunk):
        sx = np.sign(x[start:start + chunk, None] - x[None, :])
        sy = np.sign(y[start:start + chunk, None] - y[None, :])
        concordance += float((sx * sy).sum())
        ties_x += float((sx == 0).sum())
        ties_y += float((sy == 0).sum())
    # every pair was seen twice (i, j) and (j, i); the diagonal adds n ties to each count
    pairs = n * (n - 1) / 2
    tied_x, tied_y = (ties_x - n) / 2, (ties_y - n) / 2
    denom = np.sqrt((pairs - tied_x) * (pairs - tied_y))
    return float(concordance / 2 / denom) if denom > 0 else None


def _layer_mass(means: dict[Head, float], num_layers: int) -> list[float]:
    """Share of the file's positive score mass in each layer (QRHead's calibrated scores can be negative)."""
    mass = np.zeros(num_layers)
    for (layer, _), value in means.items():
        mass[layer] += max(value, 0.0)
    total = mass.sum()
    return [float(m) for m in (mass / total if total > 0 else mass)]


def format_compare(result: dict) -> str:
    """The comparison table ``retmask heads compare`` prints."""
    lines = [f"reference A: {result['reference']}"]
    for c in result["comparisons"]:
        rho, tau = c["spearman"], c["kendall_tau_b"]
        lines.append(f"B: {c['b']}")
        lines.append(f"  Spearman {_num(rho)}, Kendall tau-b {_num(tau)} over {c['num_heads_total']} heads")
        lines.append(f"  {'k':>4}  {'shared':>7}  only in A's top-k | only in B's top-k")
        for row in c["overlap"]:
            tie = " (cut inside a tie)" if row["cut_in_tie"]["a"] or row["cut_in_tie"]["b"] else ""
            lines.append(f"  {row['k']:>4}  {row['shared']:>3}/{row['k']:<3}  {_heads(row['only_a'])} | "
                         f"{_heads(row['only_b'])}{tie}")
        mass = c["layer_mass"]
        lines.append(f"  score mass by layer: A {_top_layers(mass['a'])} | B {_top_layers(mass['b'])}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "undefined (a file has one value for every head)" if value is None else f"{value:.3f}"


def _heads(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN]) or "-"
    return shown + (f", ... (+{len(names) - _SHOWN})" if len(names) > _SHOWN else "")


def _top_layers(mass: list[float], count: int = 3) -> str:
    order = sorted(range(len(mass)), key=lambda l: (-mass[l], l))[:count]
    return ", ".join(f"L{l} {mass[l]:.0%}" for l in order if mass[l] > 0) or "no positive mass"


def plot_compare(files: list[HeadScores], path: str | Path, labels: list[str] | None = None, k: int = 10) -> Path:
    """Side-by-side layers x heads heatmaps, each on its own colour scale (methods' scales differ).

    Circles mark each file's own top-k heads; crosses mark the first file's top-k on the others, so a circle
    with a cross is a head both agree on.
    """
    import matplotlib.pyplot as plt

    from retrieval_heads.plots import head_grid  # selects the Agg backend (pyplot switches to it)

    for other in files[1:]:
        _check_same_heads(files[0], other)
    num_layers, num_heads = _extent(files[0].heads)
    labels = labels or [Path(f.source).name for f in files]
    k = min(k, len(files[0].trials))
    reference_top = [h for h, _ in files[0].ranked()[:k]]
    width = max(3.5, num_heads * 0.3 + 1.8)
    height = max(4, num_layers * 0.22 + 1.5)
    fig, axes = plt.subplots(1, len(files), figsize=(width * len(files), height), squeeze=False)
    for i, (scores, ax) in enumerate(zip(files, axes[0])):
        image = ax.imshow(head_grid(scores, num_layers, num_heads), aspect="auto", cmap="viridis", origin="lower")
        own = [h for h, _ in scores.ranked()[:k]]
        ax.scatter([h for _, h in own], [l for l, _ in own], s=40, facecolors="none", edgecolors="white",
                   linewidths=1.2)
        if i:
            ax.scatter([h for _, h in reference_top], [l for l, _ in reference_top], s=30, marker="x", c="red",
                       linewidths=1)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        if num_heads <= 16:
            ax.set_xticks(range(num_heads))
        ax.set_title(f"{labels[i]}\n(o: top-{k}" + (f", x: top-{k} of {labels[0]})" if i else ")"), fontsize=8)
        fig.colorbar(image, ax=ax, label="mean score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
