"""psa_vlm.viz: the level-map figure shows the map it was given, with named levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psa_vlm.viz import LEVEL_NAMES, LEVEL_ORDER, plot_level_map


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


def test_level_map_draws_invisible_pairs_apart_from_skipped_ones():
    import psa_kernels

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    nq, bq, bk = int(torch.randint(3, 9, (), generator=g)), 64, 32
    visible = psa_kernels.block_visibility(batch=1, q_len=nq * bq, k_len=nq * bq, block_q=bq, block_k=bk,
                                           causal=True)
    codes = torch.tensor([0, 1, 2, 4, 8])
    m = codes[torch.randint(0, 5, visible.shape, generator=g)] * visible  # invisible pairs hold 0, like skipped
    fig = plot_level_map(m, block_q=bq, block_k=bk, visible=visible)
    ax, bar = fig.axes
    shown = np.asarray(ax.images[0].get_array())
    ranks = np.vectorize({v: i for i, v in enumerate(LEVEL_ORDER)}.get)(m[0].numpy())
    vis = visible[0].numpy()
    assert np.array_equal(shown[vis], ranks[vis])  # visible pairs as before, skipped ones included
    assert (shown[~vis] == len(LEVEL_ORDER)).all() and (~vis).any()  # their own class after the levels
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert labels[:len(LEVEL_ORDER)] == [LEVEL_NAMES[v] for v in LEVEL_ORDER]
    assert labels[len(LEVEL_ORDER):] == ["not visible (causal)"]
    assert "visible pairs" in ax.get_title()


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


def test_level_map_marks_text_rows_and_columns():
    m = np.ones((4, 6), dtype=np.int64)
    fig = plot_level_map(m, text_rows=[False, False, False, True], text_cols=[True] + [False] * 5)
    ax = fig.axes[0]
    rows, cols = ax.collections
    assert rows.get_offsets()[:, 1].tolist() == [3] and cols.get_offsets()[:, 0].tolist() == [0]
    assert ax.get_legend().get_title().get_text() == "unmarked blocks: vision"


def _bench_rows():
    def variant(name, sp, total, err):
        return dict(name=name, sparsity=sp, total_ms=total, attend_ms=total / 2, flex_ms=total / 3, rel_err=err,
                    flex_rel_err=2 * err)

    return [dict(kind="video-like", shape="text-causal", L=L, dense_ms=L / 1000,
                 variants=[variant("video_mme", 0.6, L / 2000, 0.2), variant("sparsity 0.9", 0.9, L / 4000, 0.5),
                           variant("sparsity 0.5", 0.5, L / 1500, 0.1)])
            for L in (4096, 8192)] + [dict(kind="random", shape="text-causal", L=16384, dense_ms=1.0, variants=[])]


def test_attention_benchmark_figure_plots_the_rows_it_was_given():
    from psa_vlm.viz import plot_attention_benchmark

    fig = plot_attention_benchmark(_bench_rows())
    a, b, c = fig.axes
    dense = a.lines[0]
    assert list(dense.get_xdata()) == [4096, 8192] and list(dense.get_ydata()) == [4.096, 8.192]  # random row left out
    assert a.get_xlabel() == "sequence length (tokens)" and "ms" in a.get_ylabel()
    psa_err = c.lines[0]
    assert list(psa_err.get_xdata()) == [0.5, 0.9] and list(psa_err.get_ydata()) == [0.1, 0.5]  # fixed sparsities, sorted
    assert list(c.lines[1].get_ydata()) == [0.2, 1.0]
    assert "8192 tokens" in b.get_title() and b.get_xlabel() == "sparsity (1 - density)"
    with pytest.raises(ValueError, match="no benchmark rows"):
        plot_attention_benchmark(_bench_rows(), kind="other")


def test_error_vs_budget_figure():
    from psa_vlm.viz import plot_error_vs_budget

    fig = plot_error_vs_budget({"PSA": [(0.8, 0.3), (0.5, 0.1)], "binary": [(0.5, 0.4)]})
    ax = fig.axes[0]
    assert [list(line.get_xdata()) for line in ax.lines] == [[0.5, 0.8], [0.5]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["PSA", "binary"]
    assert "relative error" in ax.get_ylabel()


def test_binary_baseline_spends_psa_flops_row_by_row():
    import psa_kernels
    from psa_vlm.compare import binary_map_like, row_density

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    nq = nk = 16
    visible = psa_kernels.block_visibility(batch=1, q_len=nq * 64, k_len=nk * 64, block_q=64, block_k=64,
                                           causal=True)[:, None]
    codes = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)
    psa = torch.where(visible, codes[torch.randint(0, 5, (1, 2, nq, nk), generator=g)], 0)
    psa[..., -1, :] = visible[..., -1, :].to(torch.int8)  # a forced (text) row: everything at level 1
    forced = torch.zeros_like(visible)
    forced[..., -1, :] = True
    scores = torch.rand(1, 2, nq, nk, generator=g)
    density = row_density(psa, visible)
    binary = binary_map_like(scores, visible.expand_as(psa), density, forced.expand_as(psa))
    kept = binary.sum(-1, keepdim=True).float()
    n_vis = visible.sum(-1, keepdim=True).float()
    assert torch.all((kept - torch.clamp(torch.round(density * n_vis), min=1)).abs() < 0.5)
    assert torch.equal(binary[..., -1, :], psa[..., -1, :])  # the forced row stays whole
    assert set(binary.unique().tolist()) <= {0, 1} and not (binary.bool() & ~visible).any()


def test_binary_map_at_same_flops_is_the_call_geometrys_baseline():
    """The benchmarks' one-call helper: visible and forced blocks of the call's geometry, a GQA
    group's scores summed when the map is shared, then binary_map_like."""
    import psa_kernels
    from psa_vlm.compare import binary_map_at_same_flops, binary_map_like

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    L, block = 1000, 64  # 16 blocks, the last one partial
    scores = torch.rand(1, 6, 16, 16, generator=g)
    text = torch.zeros(1, L, dtype=torch.bool)
    text[:, -100:] = True
    geometry = dict(batch=1, q_len=L, k_len=L, block_q=block, block_k=block, causal=True)
    visible = psa_kernels.block_visibility(**geometry)[:, None]
    forced = psa_kernels.forced_full_blocks(**geometry, text_mask=text)[:, None]
    shared = scores.view(1, 2, 3, 16, 16).sum(2)
    want = binary_map_like(shared, visible.expand_as(shared), 0.3, forced.expand_as(shared))
    got = binary_map_at_same_flops(scores, 0.3, q_len=L, k_len=L, block_q=block, block_k=block, causal=True,
                                   text_mask=text, kv_heads=2)
    assert got.shape == (1, 2, 16, 16) and torch.equal(got, want)
    per_head = binary_map_at_same_flops(scores, 0.3, q_len=L, k_len=L, block_q=block, block_k=block, causal=True,
                                        text_mask=text)
    assert per_head.shape == scores.shape
    assert torch.equal(per_head, binary_map_like(scores, visible.expand_as(scores), 0.3, forced.expand_as(scores)))
