"""Figures for papers: correlation heatmaps, score-vs-CER scatter, training curves (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_path  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", metadata={"Software": "comflp"})
    plt.close(fig)
    return path


def heatmap(matrix: np.ndarray, path: str | os.PathLike, *, title: str = "", annotate: bool = True) -> Path:
    """Heatmap of an (L+1) x (L+1) layer-by-layer matrix; axes are hidden-state indices 0..L.

    The colour scale spans the off-diagonal values (the diagonal is 1 by
    definition), so matrices whose entries all lie in, say, 0.96-1.0 still
    show their structure; the colour bar gives the scale.
    """
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(0.45 * n + 2.5, 0.45 * n + 1.8))
    off = matrix[~np.eye(n, dtype=bool)] if n > 1 else matrix.ravel()
    lo, hi = float(np.nanmin(off)), float(np.nanmax(off))
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    im = ax.imshow(matrix, cmap="viridis", vmin=lo, vmax=hi)
    threshold = lo + 0.6 * (hi - lo)
    digits = 2 if hi - lo >= 0.1 else 3 if hi - lo >= 0.01 else 4  # enough digits to tell cells apart
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("hidden state")
    ax.set_ylabel("hidden state")
    if title:
        ax.set_title(title)
    if annotate and n <= 16:
        for i in range(n):
            for j in range(n):
                v = matrix[i, j]
                ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=6 if digits < 4 else 5,
                        color="white" if v < threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def scatter(x: list[float], y: list[float], path: str | os.PathLike, *, xlabel: str, ylabel: str,
            title: str = "") -> Path:
    """Scatter plot with a least-squares line (e.g. coarse score vs CER of candidates)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.scatter(x, y, s=18)
    if len(x) > 1 and np.ptp(x) > 0:
        k, b = np.polyfit(x, y, 1)
        xs = np.linspace(min(x), max(x), 10)
        ax.plot(xs, k * xs + b, "--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def curves(series: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike, *, xlabel: str,
           ylabel: str, title: str = "", hlines: dict[str, float] | None = None, loglog: bool = False,
           styles: dict[str, dict] | None = None) -> Path:
    """Line plot of named (x, y) series, e.g. dev CER per epoch, with optional named reference lines.

    ``loglog``: both axes logarithmic, ticks at the x values; ``styles``: extra matplotlib line
    options per series name (e.g. a dashed line for extrapolated values).
    """
    fig, ax = plt.subplots(figsize=(5.5, 4) if loglog else (4.5, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, **{"marker": "o", "ms": 3, "label": name, **(styles or {}).get(name, {})})
    if loglog:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.grid(True, which="both", alpha=0.3)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, color="gray", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def scatter_grid(panels: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike, *, xlabel: str,
                 ylabel: str, titles: dict[str, str] | None = None) -> Path:
    """One scatter plot per named (x, y) panel, in a grid sharing the y axis (e.g. score vs CER per measure)."""
    n = len(panels)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True, squeeze=False)
    for ax, (name, (x, y)) in zip(axes.flat, panels.items()):
        ax.scatter(x, y, s=12)
        ax.set_title((titles or {}).get(name, name), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)
