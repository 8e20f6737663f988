"""psa_vlm.viz: the level-map figure shows the map it was given, with named levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psa_vlm.viz import LEVEL_ORDER, plot_level_map


def test_level_map_figure_holds_the_map_and_names_the_levels():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    codes = torch.tensor([0, 1, 2, 4, 8])
    m = codes[torch.randint(0, 5, (2, 3, 7, 11), generator=g)]
    fig = plot_level_map(m, block_q=64, block_k=32, text_rows=[False] * 6 + [True])
    ax, bar = fig.axes
    image = ax.images[0].get_array()
    ranks = np.vectorize({v: i for i, v in enumerate(LEVEL_ORDER)}.get)(m[0, 0].numpy())
    assert image.shape == (7, 11) and np.array_equal(np.asarray(image), ranks)  # batch 0, head 0, in rank order
    assert "key block (32 tokens each)" == ax.get_xlabel() and "query block (64 tokens each)" == ax.get_ylabel()
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert labels == ["level 1 (full)", "level 2 (2x pooled)", "level 4 (4x pooled)", "level 8 (8x pooled)", "skipped"]
    assert ax.get_title()


def test_bad_level_values_are_named():
    with pytest.raises(ValueError, match=r"\[3\]"):
        plot_level_map(np.array([[1, 3], [0, 2]]))


def test_level_shares_and_coverage_count_only_visible_pairs():
    import psa_kernels
    from psa_vlm.viz import coverage, level_shares, plot_level_shares

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    visible = psa_kernels.block_visibility(batch=1, q_len=640, k_len=640, block_q=64, block_k=64, causal=True)[0]
    codes = torch.tensor([0, 1, 2, 4, 8])
    m = codes[torch.randint(0, 5, (10, 10), generator=g)] * visible  # invisible pairs are skipped
    shares = level_shares(m, visible)
    n = int(visible.sum())
    for v in (1, 2, 4, 8, 0):
        assert shares[v] == pytest.approx(int(((m == v) & visible).sum()) / n)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert coverage(m, visible) == pytest.approx(int(((m > 0) & visible).sum()) / n)
    binary = (m == 1).int()  # keeps only the full-resolution pairs
    assert coverage(binary, visible) <= coverage(m, visible)
    fig = plot_level_shares({"PSA": shares, "binary": level_shares(binary, visible)})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["PSA", "binary"]
    assert len(ax.patches) == 2 * 5  # one bar segment per level per map
    assert ax.get_ylabel() == "share of visible block pairs"


def test_sparsity_heatmap_holds_the_values():
    from psa_vlm.viz import plot_sparsity

    s = torch.rand(4, 7)
    fig = plot_sparsity(s, layer_labels=[0, 1, 2, 3])
    ax, bar = fig.axes
    assert np.allclose(np.asarray(ax.images[0].get_array()), s.numpy())
    assert bar.get_ylabel() == "sparsity (1 - density)" and ax.get_ylabel() == "layer"
    with pytest.raises(ValueError, match="layers, heads"):
        plot_sparsity(torch.rand(3))
