"""Plots of PSA level maps and benchmark results (matplotlib; figures are returned, never shown).

Level values follow docs/semantics.md: 1 = full resolution, 2/4/8 = mean-pooled keys, 0 = skipped.
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
# Pairs no query of the block can see (the causal upper triangle): not a choice PSA made, so a
# neutral colour apart from the blue scale and from "skipped".
INVISIBLE_NAME = "not visible (causal)"
INVISIBLE_COLOUR = "#9e9e9e"


def _first_2d(x) -> np.ndarray:
    m = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    while m.ndim > 2:  # [B, H, nq, nk] -> the first batch element and head
        m = m[0]
    return m


def _as_2d(level_map) -> np.ndarray:
    m = _first_2d(level_map)
    if m.ndim != 2:
        raise ValueError(f"a level map needs 2 dimensions [nq, nk] (or leading batch/head ones), got {m.shape}")
    bad = ~np.isin(m, LEVEL_ORDER)
    if bad.any():
        raise ValueError(f"level map values must be in {sorted(LEVEL_ORDER)}, got {sorted(set(m[bad].tolist()))[:8]}")
    return m.astype(np.int64)


def plot_level_map(level_map, *, title: str | None = None, block_q: int | None = None, block_k: int | None = None,
                   text_rows=None, text_cols=None, visible=None, ax=None):
    """Heatmap of one level map ``[nq, nk]`` (query blocks down, key blocks across).

    ``block_q``/``block_k`` label the axes in tokens as well as blocks; ``text_rows`` (bool per
    query block) and ``text_cols`` (bool per key block) mark the blocks holding text with red
    ticks on the right and on top; the unmarked ones are vision. ``visible`` (bool ``[nq, nk]``,
    e.g. ``psa_kernels.block_visibility(...)[0]``) draws the pairs no query can see in grey as
    "not visible (causal)", apart from the visible pairs PSA skipped. Returns the figure.
    """
    import matplotlib.pyplot as plt  # the active backend: inline in notebooks, Agg when headless
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    m = _as_2d(level_map)
    rank = np.vectorize({v: i for i, v in enumerate(LEVEL_ORDER)}.get)(m)
    names = [LEVEL_NAMES[v] for v in LEVEL_ORDER]
    colours = [LEVEL_COLOURS[v] for v in LEVEL_ORDER]
    vis = None
    if visible is not None:
        vis = np.broadcast_to(_first_2d(visible).astype(bool), m.shape)
        rank = np.where(vis, rank, len(LEVEL_ORDER))  # one more class after the levels
        names.append(INVISIBLE_NAME)
        colours.append(INVISIBLE_COLOUR)
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(len(colours) + 1) - 0.5, cmap.N)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
    else:
        fig = ax.figure
    image = ax.imshow(rank, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto")
    bar = fig.colorbar(image, ax=ax, ticks=range(len(colours)))
    bar.ax.set_yticklabels(names)
    bar.set_label("resolution at which the query block reads the key block")
    ax.set_xlabel("key block" + (f" ({block_k} tokens each)" if block_k else ""))
    ax.set_ylabel("query block" + (f" ({block_q} tokens each)" if block_q else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    nq, nk = m.shape
    per_pair = np.where(m > 0, 1.0 / np.maximum(m, 1), 0.0)
    density = per_pair.mean() if vis is None else per_pair[vis].mean() if vis.any() else 0.0
    pairs = "all" if vis is None else "visible"
    ax.set_title(title or f"PSA level map ({nq} x {nk} blocks, mean 1/p over {pairs} pairs {density:.2f})")
    if text_rows is not None:
        rows = np.flatnonzero(np.asarray(text_rows, dtype=bool))
        ax.scatter(np.full(rows.shape, nk - 0.5), rows, marker="<", color="#d62728", s=30, clip_on=False,
                   label="text query rows")
    if text_cols is not None:
        cols = np.flatnonzero(np.asarray(text_cols, dtype=bool))
        ax.scatter(cols, np.full(cols.shape, -0.5), marker="v", color="#d62728", s=30, clip_on=False,
                   label="text key columns")
    if (text_rows is not None and np.any(text_rows)) or (text_cols is not None and np.any(text_cols)):
        # below the axes, so it hides no block
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7,
                  title="unmarked blocks: vision", title_fontsize=7)
    fig.tight_layout()
    return fig


def level_shares(level_map, visible=None) -> dict[int, float]:
    """Share of (visible) block pairs at each level code (1, 2, 4, 8, 0 = skipped); sums to 1.

    ``visible`` (bool, broadcastable to the map) restricts the count to pairs that can hold a
    visible key, e.g. the causal lower triangle (``psa_kernels.block_visibility``)."""
    m = level_map.detach().cpu().numpy() if hasattr(level_map, "detach") else np.asarray(level_map)
    mask = np.ones(m.shape, dtype=bool) if visible is None else np.broadcast_to(
        visible.detach().cpu().numpy() if hasattr(visible, "detach") else np.asarray(visible), m.shape)
    total = mask.sum()
    if total == 0:
        raise ValueError("no visible block pair to count")
    return {v: float(((m == v) & mask).sum() / total) for v in LEVEL_ORDER}


def coverage(level_map, visible=None) -> float:
    """Fraction of (visible) block pairs read at any level: what binary block-sparse attention
    of the same FLOPs cannot match, since it skips every pair it does not read in full."""
    return 1.0 - level_shares(level_map, visible)[0]


def plot_level_shares(shares: dict[str, dict[int, float]], *, title: str | None = None, ax=None):
    """Stacked bars: for each named map (e.g. a layer, or PSA vs binary), the share of pairs at
    each level. ``shares`` maps a label to :func:`level_shares`' result. Returns the figure."""
    import matplotlib.pyplot as plt  # the active backend: inline in notebooks, Agg when headless

    if not shares:
        raise ValueError("no level shares to plot")
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 * len(shares) + 3.5, 4.0))
    else:
        fig = ax.figure
    labels = list(shares)
    bottom = np.zeros(len(labels))
    for v in LEVEL_ORDER:
        heights = np.array([shares[name].get(v, 0.0) for name in labels])
        ax.bar(labels, heights, bottom=bottom, color=LEVEL_COLOURS[v], edgecolor="#888888", linewidth=0.5,
               label=LEVEL_NAMES[v])
        bottom += heights
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of visible block pairs")
    ax.set_title(title or "Resolution of the block pairs")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_sparsity(sparsity, *, layer_labels=None, title: str | None = None, ax=None):
    """Heatmap of PSA sparsity (1 - density) per layer (rows) and head (columns). Returns the figure."""
    import matplotlib.pyplot as plt  # the active backend: inline in notebooks, Agg when headless

    s = sparsity.detach().cpu().numpy() if hasattr(sparsity, "detach") else np.asarray(sparsity, dtype=float)
    if s.ndim != 2:
        raise ValueError(f"sparsity needs 2 dimensions [layers, heads], got {s.shape}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * s.shape[1] + 2.5), max(3.0, 0.3 * s.shape[0] + 1.5)))
    else:
        fig = ax.figure
    image = ax.imshow(s, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax).set_label("sparsity (1 - density)")
    ax.set_xlabel("head (level-map head: query head, or kv head when shared)")
    ax.set_ylabel("layer")
    if layer_labels is not None:
        ax.set_yticks(range(len(layer_labels)), [str(x) for x in layer_labels])
    ax.set_title(title or f"PSA sparsity per layer and head (mean {s.mean():.3f})")
    fig.tight_layout()
    return fig


def plot_attention_benchmark(rows, *, kind: str = "video-like", names=("video_mme", "sparsity 0.9")):
    """The attention benchmark's results (``benchmarks/attention.py``, its JSON ``rows``): time vs
    sequence length for dense SDPA and PSA, and, at the longest length, time and relative error
    vs sparsity for PSA and binary block-sparse attention (FlexAttention) at the same FLOPs.
    Returns the figure (three panels)."""
    import matplotlib.pyplot as plt  # the active backend: inline in notebooks, Agg when headless

    rows = [r for r in rows if r["kind"] == kind]
    if not rows:
        raise ValueError(f"no benchmark rows with inputs {kind!r}")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.6))
    for shape in sorted({r["shape"] for r in rows}):
        sel = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["L"])
        lengths = [r["L"] for r in sel]
        a.plot(lengths, [r["dense_ms"] for r in sel], "k-o", label=f"dense SDPA ({shape})")
        for name in names:
            ys = [next((v["total_ms"] for v in r["variants"] if v["name"] == name), float("nan")) for r in sel]
            a.plot(lengths, ys, "-o", label=f"PSA {name}, total ({shape})")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("sequence length (tokens)")
    a.set_ylabel("time per attention call (ms)")
    a.set_title(f"Time vs length ({kind} inputs)")
    a.legend(fontsize=7)
    longest = max(rows, key=lambda r: r["L"])
    fixed = sorted((v for v in longest["variants"] if v["name"].startswith("sparsity")), key=lambda v: v["sparsity"])
    sp = [v["sparsity"] for v in fixed]
    b.plot(sp, [v["total_ms"] for v in fixed], "-o", label="PSA total (estimate + assign + attend)")
    b.plot(sp, [v["attend_ms"] for v in fixed], "--o", label="PSA attend only")
    b.plot(sp, [v.get("flex_ms", float("nan")) for v in fixed], "-s", label="binary block-sparse (same FLOPs)")
    b.axhline(longest["dense_ms"], color="k", label="dense SDPA")
    b.set_xlabel("sparsity (1 - density)")
    b.set_ylabel("time (ms)")
    b.set_title(f"Time vs sparsity, {longest['L']} tokens ({longest['shape']})")
    b.legend(fontsize=7)
    c.plot(sp, [v["rel_err"] for v in fixed], "-o", label="PSA")
    c.plot(sp, [v.get("flex_rel_err", float("nan")) for v in fixed], "-s", label="binary block-sparse (same FLOPs)")
    c.set_xlabel("sparsity (1 - density)")
    c.set_ylabel("relative error vs dense (Frobenius)")
    c.set_title(f"Error vs sparsity, {longest['L']} tokens ({longest['shape']})")
    c.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_error_vs_budget(results: dict[str, list[tuple[float, float]]], *, title: str | None = None, ax=None):
    """Relative error vs sparsity, one line per method: ``{"PSA": [(sparsity, error), ...], ...}``.
    Returns the figure."""
    import matplotlib.pyplot as plt  # the active backend: inline in notebooks, Agg when headless

    if not results:
        raise ValueError("no results to plot")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 4.2))
    else:
        fig = ax.figure
    for (name, points), marker in zip(results.items(), "os^vD"):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], f"-{marker}", label=name)
    ax.set_xlabel("sparsity (1 - density)")
    ax.set_ylabel("relative error vs dense attention (Frobenius)")
    ax.set_title(title or "Error vs compute budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
