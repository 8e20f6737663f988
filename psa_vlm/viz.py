"""Plots of PSA level maps (matplotlib; figures are returned, never shown).

Level values follow PSA_SEMANTICS.md: 1 = full resolution, 2/4/8 = mean-pooled keys, 0 = skipped.
The colour scale is discrete and ordered by resolution (darker = more detail), so a map reads at
a glance: where each query block looks, and how sharply.
"""

from __future__ import annotations

import numpy as np

# Order of the colour bar: finest first. Values are the level codes of a map.
LEVEL_ORDER = (1, 2, 4, 8, 0)
LEVEL_NAMES = {1: "level 1 (full)", 2: "level 2 (2x pooled)", 4: "level 4 (4x pooled)", 8: "level 8 (8x pooled)",
               0: "skipped"}
LEVEL_COLOURS = {1: "#08306b", 2: "#2171b5", 4: "#6baed6", 8: "#c6dbef", 0: "#f7f7f7"}


def _as_2d(level_map) -> np.ndarray:
    m = level_map.detach().cpu().numpy() if hasattr(level_map, "detach") else np.asarray(level_map)
    while m.ndim > 2:  # [B, H, nq, nk] -> the first batch element and head
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"a level map needs 2 dimensions [nq, nk] (or leading batch/head ones), got {m.shape}")
    bad = ~np.isin(m, LEVEL_ORDER)
    if bad.any():
        raise ValueError(f"level map values must be in {sorted(LEVEL_ORDER)}, got {sorted(set(m[bad].tolist()))[:8]}")
    return m.astype(np.int64)


def plot_level_map(level_map, *, title: str | None = None, block_q: int | None = None, block_k: int | None = None,
                   text_rows=None, ax=None):
    """Heatmap of one level map ``[nq, nk]`` (query blocks down, key blocks across).

    ``block_q``/``block_k`` label the axes in tokens as well as blocks; ``text_rows`` (bool per
    query block) marks the rows holding text with a tick on the right. Returns the figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    m = _as_2d(level_map)
    rank = np.vectorize({v: i for i, v in enumerate(LEVEL_ORDER)}.get)(m)
    cmap = ListedColormap([LEVEL_COLOURS[v] for v in LEVEL_ORDER])
    norm = BoundaryNorm(np.arange(len(LEVEL_ORDER) + 1) - 0.5, cmap.N)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
    else:
        fig = ax.figure
    image = ax.imshow(rank, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto")
    bar = fig.colorbar(image, ax=ax, ticks=range(len(LEVEL_ORDER)))
    bar.ax.set_yticklabels([LEVEL_NAMES[v] for v in LEVEL_ORDER])
    bar.set_label("resolution at which the query block reads the key block")
    ax.set_xlabel("key block" + (f" ({block_k} tokens each)" if block_k else ""))
    ax.set_ylabel("query block" + (f" ({block_q} tokens each)" if block_q else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    nq, nk = m.shape
    density = np.where(m > 0, 1.0 / np.maximum(m, 1), 0.0).mean()
    ax.set_title(title or f"PSA level map ({nq} x {nk} blocks, mean 1/p over all pairs {density:.2f})")
    if text_rows is not None:
        rows = np.flatnonzero(np.asarray(text_rows, dtype=bool))
        ax.scatter(np.full(rows.shape, nk - 0.5), rows, marker="<", color="#d62728", s=12, clip_on=False,
                   label="text query rows")
        if rows.size:
            ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    return fig
