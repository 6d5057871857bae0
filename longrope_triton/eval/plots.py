"""Tables and PNG plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import pathlib
from typing import Mapping, Optional, Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table with aligned columns (floats to 3 decimals)."""
    def cell(v):
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3f}"
        return str(v)
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(out)


def perplexity_table(results: Mapping[str, Mapping[int, float]]) -> str:
    """results: {method: {length: perplexity}} -> table with one row per method."""
    lengths = sorted({n for per in results.values() for n in per})
    rows = [[m] + [per.get(n, float("nan")) for n in lengths] for m, per in results.items()]
    return format_table(["method"] + [str(n) for n in lengths], rows)


def plot_perplexity(results: Mapping[str, Mapping[int, float]], path, title: str = "Perplexity vs context length",
                    trained_length: Optional[int] = None) -> pathlib.Path:
    """Line plot of perplexity vs length (log y), one line per method; returns the PNG path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, per in results.items():
        lengths = sorted(per)
        values = [per[n] for n in lengths]
        ax.plot(lengths, values, marker="o", label=method)
        if len(lengths) == 1:
            ax.annotate(f"{values[0]:.2f}", (lengths[0], values[0]), textcoords="offset points", xytext=(6, 4))
    if trained_length:
        ax.axvline(trained_length, color="grey", linestyle="--", linewidth=1)
        ax.text(trained_length, ax.get_ylim()[1], " trained context", va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (scored tail)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


def plot_bars(values: Mapping[str, float], path, title: str, ylabel: str = "perplexity") -> pathlib.Path:
    """Bar chart of one number per method (the quick demo: one length)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=["#999999", "#1f77b4", "#2ca02c", "#d62728",
                                                              "#9467bd", "#8c564b"][: len(names)])
    for bar, n in zip(bars, names):
        ax.annotate(f"{values[n]:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, plt, path)


def plot_passkey_heatmap(accuracy: Mapping[tuple, float], path, title: str = "Passkey retrieval accuracy"
                         ) -> pathlib.Path:
    """Heat-map of accuracy[(length, depth)] (rows: depth, columns: length)."""
    plt = _pyplot()
    lengths = sorted({n for n, _ in accuracy})
    depths = sorted({d for _, d in accuracy})
    grid = [[accuracy.get((n, d), float("nan")) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=9)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy")
    return _save(fig, plt, path)


def _save(fig, plt, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
