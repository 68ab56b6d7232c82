"""How training moved the retrieval heads: one base score file against each trained model's, on the same grid.

The study's mechanism outcome (docs/STUDY.md, "Outcomes" -> "Mechanism") asks whether DPO with RetMask moved
the heads it masked differently from the control. Both models are scored with the base model's detection grid, so
the raw mean scores are on one scale and their differences mean something; the ranking statistics (Spearman,
Kendall, top-k overlap) come from ``compare.compare`` so both reports agree on ties and on k. Layer mass here is the
plain sum of mean scores per layer (not compare's positive share), so the per-layer changes add up to the total
change over all heads. A head "crosses" the threshold when ``select_threshold`` picks it in one file and not in
the other, which keeps the crossing list identical to what the selection rule would do with each file.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np

from retrieval_heads.compare import _extent, _heads, _num, compare
from retrieval_heads.errors import RetmaskError
from retrieval_heads.scores import Head, HeadScores, select_threshold

# "at least 0.05" must hold for 0.10 -> 0.15, whose float difference is 0.04999999999999999
_TOLERANCE = 1e-9
_SHOWN = 5  # heads listed per line of the printed report (the result dict holds them all)


def score_shift(base: HeadScores, trained: dict[str, HeadScores], k: int, threshold: float = 0.1,
                min_change: float = 0.05) -> dict:
    """Per-head and per-layer change of each trained model's mean scores against ``base`` (JSON-serializable)."""
    if not trained:
        raise RetmaskError(f"score_shift needs at least one trained model's scores to set against {base.source}")
    if not isinstance(min_change, numbers.Real) or isinstance(min_change, bool) or not math.isfinite(min_change) \
            or min_change <= 0:
        raise RetmaskError(f"min_change must be a finite number above 0 (the study uses 0.05), got {min_change!r}")
    base_selected = set(select_threshold(base, threshold))  # also refuses a threshold <= 0
    num_layers, num_heads = _extent(base.heads)
    models = {}
    for name, scores in trained.items():
        ranking = compare(base, scores, ks=(k,))  # refuses another shape and a k outside 1..heads
        models[str(name)] = _shift_one(base, scores, ranking, base_selected, threshold, min_change,
                                       num_layers, num_heads)
    return {"base": base.source, "k": k, "threshold": float(threshold), "min_change": float(min_change),
            "num_layers": num_layers, "num_heads": num_heads, "num_heads_total": len(base.trials),
            "models": models}


def _shift_one(base: HeadScores, trained: HeadScores, ranking: dict, base_selected: set[Head], threshold: float,
               min_change: float, num_layers: int, num_heads: int) -> dict:
    before, after = base.mean(), trained.mean()
    change = {h: after[h] - before[h] for h in before}
    # a grid cell with no head in the files stays None: a missing head is not a head that did not move
    grid: list[list[float | None]] = [[None] * num_heads for _ in range(num_layers)]
    mass_before, mass_after = np.zeros(num_layers), np.zeros(num_layers)
    for (layer, head), value in change.items():
        grid[layer][head] = float(value)
        mass_before[layer] += before[(layer, head)]
        mass_after[layer] += after[(layer, head)]
    by_size = sorted(change, key=lambda h: (-abs(change[h]), h))
    trained_selected = set(select_threshold(trained, threshold))

    def rows(heads) -> list[dict]:
        return [{"head": f"{l}-{h}", "base": float(before[(l, h)]), "trained": float(after[(l, h)]),
                 "change": float(change[(l, h)])} for l, h in heads]

    overlap = ranking["overlap"][0]
    return {
        "source": trained.source,
        "change": grid,
        "total_change": float(sum(change.values())),
        "spearman": ranking["spearman"],
        "kendall_tau_b": ranking["kendall_tau_b"],
        "overlap": {"k": overlap["k"], "shared": overlap["shared"], "fraction": overlap["fraction"],
                    "only_base": overlap["only_a"], "only_trained": overlap["only_b"],
                    "cut_in_tie": {"base": overlap["cut_in_tie"]["a"], "trained": overlap["cut_in_tie"]["b"]}},
        "layer_mass": {"base": [float(m) for m in mass_before], "trained": [float(m) for m in mass_after],
                       "change": [float(m) for m in mass_after - mass_before]},
        "gained": rows(h for h in by_size if change[h] >= min_change - _TOLERANCE),
        "lost": rows(h for h in by_size if change[h] <= -min_change + _TOLERANCE),
        "crossed_up": rows(h for h in by_size if h in trained_selected and h not in base_selected),
        "crossed_down": rows(h for h in by_size if h in base_selected and h not in trained_selected),
    }


def format_shift(result: dict) -> str:
    """A short report of ``score_shift``: correlations, overlap, the layers and heads that moved most."""
    k, t, m = result["k"], result["threshold"], result["min_change"]
    lines = [f"base: {result['base']} (top-{k}, threshold {t:g}, change of at least {m:g})"]
    for name, s in result["models"].items():
        o = s["overlap"]
        tie = " (cut inside a tie)" if o["cut_in_tie"]["base"] or o["cut_in_tie"]["trained"] else ""
        lines.append(f"{name}: {s['source']}")
        lines.append(f"  Spearman {_num(s['spearman'])}, Kendall tau-b {_num(s['kendall_tau_b'])} over "
                     f"{result['num_heads_total']} heads")
        lines.append(f"  top-{k} overlap {o['shared']}/{k}{tie}; only base: {_heads(o['only_base'])} | "
                     f"only {name}: {_heads(o['only_trained'])}")
        layers = _top_layer_changes(s["layer_mass"]["change"])
        lines.append(f"  total change {s['total_change']:+.3f}; layers that moved most: {layers}")
        for key, label in (("gained", f"gained >= {m:g}"), ("lost", f"lost >= {m:g}"),
                           ("crossed_up", f"crossed {t:g} upward"), ("crossed_down", f"crossed {t:g} downward")):
            lines.append(f"  {label}: {_moves(s[key])}")
    return "\n".join(lines)


def _top_layer_changes(changes: list[float], count: int = 3) -> str:
    order = sorted(range(len(changes)), key=lambda l: (-abs(changes[l]), l))[:count]
    return ", ".join(f"L{l} {changes[l]:+.3f}" for l in order if changes[l] != 0) or "no layer moved"


def _moves(rows: list[dict]) -> str:
    if not rows:
        return "none"
    shown = ", ".join(f"{r['head']} {r['base']:.2f}->{r['trained']:.2f}" for r in rows[:_SHOWN])
    return f"{len(rows)} ({shown}" + (f", ... +{len(rows) - _SHOWN})" if len(rows) > _SHOWN else ")")


def plot_shift(base: HeadScores, trained: dict[str, HeadScores], path: str | Path) -> Path:
    """Heatmaps of base and each trained model (top row, one scale) and each difference (bottom row, centred at 0).

    Both rows share their colour scale across panels: the files come from one detection grid, so a colour means
    the same score, and the same change, in every panel.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    from retrieval_heads.plots import head_grid  # selects the Agg backend (pyplot switches to it)

    if not trained:
        raise RetmaskError(f"plot_shift needs at least one trained model's scores to set against {base.source}")
    for scores in trained.values():
        compare(base, scores, ks=(1,))  # the one shape check, with its one-line message
    num_layers, num_heads = _extent(base.heads)
    files = [base, *trained.values()]
    names = ["base"] + [str(n) for n in trained]
    grids = [head_grid(s, num_layers, num_heads) for s in files]
    diffs = [g - grids[0] for g in grids[1:]]
    low, high = min(float(g.min()) for g in grids), max(float(g.max()) for g in grids)
    spread = max((float(np.abs(d).max()) for d in diffs), default=0.0) or 1e-6  # a norm needs vmin < 0 < vmax
    centred = TwoSlopeNorm(vcenter=0.0, vmin=-spread, vmax=spread)
    width = max(3.5, num_heads * 0.3 + 1.8)
    height = max(3.5, num_layers * 0.2 + 1.5)
    fig, axes = plt.subplots(2, len(grids), figsize=(width * len(grids), height * 2), squeeze=False)
    for i, (name, scores, grid) in enumerate(zip(names, files, grids)):
        _panel(fig, axes[0][i], grid, f"{name}\n{Path(scores.source).name}", "mean score", cmap="viridis",
               vmin=low, vmax=high if high > low else low + 1e-6)
    axes[1][0].axis("off")
    for i, (name, diff) in enumerate(zip(names[1:], diffs), start=1):
        _panel(fig, axes[1][i], diff, f"{name} - base", "change of mean score", cmap="RdBu_r", norm=centred)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _panel(fig, ax, grid: np.ndarray, title: str, label: str, **style) -> None:
    from matplotlib.ticker import MaxNLocator

    image = ax.imshow(grid, aspect="auto", origin="lower", **style)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if grid.shape[1] <= 16:
        ax.set_xticks(range(grid.shape[1]))
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, label=label)
